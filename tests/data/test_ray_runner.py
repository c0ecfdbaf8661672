"""`pagoda data prepare` on Ray Data: the per-record stages run on a local Ray instance and the
output is byte-identical to a local run's (the same records kept, deduplicated, masked, in the
same order); a missing Ray is a one-line error saying what to install."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from pagoda.cli import main
from pagoda.data import pipeline
from pagoda.data.pipeline import OutputConfig, PipelineConfig, prepare
from pagoda.errors import ConfigError

# Ray Data's own settings warn about their deprecated names whenever its context is copied.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data")

WORDS = ("river village library merchant council farm grandmother harbour teacher gardener "
         "winter mountain bridge valley letter coast basket apple bell chapel map road festival "
         "market square story fisherman garden rose mill evening summer morning window kitchen "
         "bread candle lantern forest meadow orchard cottage stone wall field horse wagon journey "
         "remembered described noticed explained carried repaired painted planned walked opened "
         "gathered wrote built crossed followed quiet patient careful early late bright warm old "
         "young small large northern southern").split()
JOINS = ("the", "and", "of", "with", "in", "to", "for", "was", "that", "from")


def document(rng: random.Random) -> str:
    """Eight sentences of English words: passes the quality rules, unlike any other document."""
    sentences = [" ".join(rng.choice(WORDS) if k % 2 == 0 else rng.choice(JOINS)
                          for k in range(rng.randint(7, 12))).capitalize() + "."
                 for _ in range(8)]
    return " ".join(sentences)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """48 documents: exact and near copies, e-mail addresses and phone numbers, a footer on
    every page (boilerplate), one too short to keep."""
    rng = random.Random(7)
    rows = []
    for i in range(40):
        text = document(rng)
        if i % 4 == 0:
            text += (f"\nWrite to {rng.choice(WORDS)}.{rng.choice(WORDS)}@example.org or call "
                     f"+1 415 555 {rng.randrange(1000, 9999)} about the {rng.choice(WORDS)}.")
        text += "\nCopyright 2024 The Village Gazette. All rights reserved."
        rows.append({"text": text, "id": i})
        if i % 7 == 0:
            rows.append({"text": text, "id": f"{i}-copy"})
        if i % 13 == 0:
            rows.append({"text": text.replace(".", "!", 1), "id": f"{i}-near"})
    rows.append({"text": "too short", "id": "short"})
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "docs.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance with 2 CPUs for the module, shut down at its end."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def outputs(folder: Path) -> tuple[bytes, bytes]:
    return (folder / "data.jsonl").read_bytes(), (folder / "manifest.json").read_bytes()


@pytest.mark.slow
def test_ray_output_is_byte_identical_to_a_local_run(ray_local, corpus, tmp_path,
                                                     monkeypatch):
    from pagoda.data import ray_runner

    # Small batches and windows: many tasks and several windows per pass, so order matters.
    monkeypatch.setattr(pipeline, "BATCH_CHARS", 3000)
    monkeypatch.setattr(ray_runner, "WINDOW_PER_CPU", 2)
    config = PipelineConfig(output=OutputConfig(workers=1))
    local = prepare([corpus], tmp_path / "local", config)
    on_ray = prepare([corpus], tmp_path / "ray", config, mapper=ray_runner.ray_map)
    assert outputs(tmp_path / "ray") == outputs(tmp_path / "local")
    assert on_ray["output"] == local["output"]
    # The corpus exercised every stage, so identical output is not identical emptiness.
    rows = {row["stage"]: row for row in local["stages"]}
    assert rows["quality"]["dropped"] and rows["dedup"]["dropped"]
    assert local["pii_masked"]["email"] and local["boilerplate_lines_removed"]
    assert local["output"]["records"] >= 35


@pytest.mark.slow
def test_cli_prepare_with_ray_uses_the_connected_instance(ray_local, corpus, tmp_path, capsys):
    code = main(["data", "prepare", str(corpus), "--out", str(tmp_path / "cli"), "--ray",
                 "--workers", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["output"]["records"] >= 35
    assert ray_local.is_initialized()  # an instance it did not start is left running


def test_missing_ray_says_what_to_install(corpus, tmp_path, monkeypatch):
    from pagoda.data import ray_runner

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'pagoda\[ray\]'"):
        ray_runner.prepare_on_ray([corpus], tmp_path / "out")
    assert not (tmp_path / "out").exists()
