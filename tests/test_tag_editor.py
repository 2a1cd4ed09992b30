"""Tag editor: filters, each bulk edit through the real CLI, and undo restoring byte-identical captions."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import loratrain.dataset_tools.journal as journal_mod
from loratrain.cli import main
from loratrain.core.captions import read_caption
from loratrain.core.errors import ConfigError
from loratrain.dataset_tools.editor.caption_set import CaptionSet
from loratrain.dataset_tools.editor.config import TagsConfig
from loratrain.dataset_tools.editor.ops import apply_edit, token_count
from loratrain.dataset_tools.journal import Journal

# Odd bytes on purpose: CRLF, trailing spaces, two lines, no final newline, a BOM-free UTF-8 accent.
CAPTIONS = {
    "a": b"sks, 1girl, red hair, smile, standing\r\n",
    "b": b"1girl, blue hair,  smile , sitting, smile",
    "c": b"sks, 1boy, red hair\nsecond line, outdoors\n",
    "d": "1girl, caf\u00e9, red hair, standing".encode(),
}


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for name in [*CAPTIONS, "e"]:
        Image.new("RGB", (8, 8)).save(root / f"{name}.png")
    for name, raw in CAPTIONS.items():
        (root / f"{name}.txt").write_bytes(raw)
    return root  # e.png has no caption


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.txt"))}


def tags_of(root: Path, name: str) -> list[str]:
    """The tags the trainer reads: the caption's first line (later lines are kept but never trained on)."""
    return [t.strip() for t in read_caption(root / f"{name}.png", ".txt").split(",")]


def test_filters_select_all_any_none(data):
    cs = CaptionSet.load(data)
    names = lambda entries: sorted(e.image.stem for e in entries)  # noqa: E731
    assert names(cs.select(all_of=["1girl", "red hair"])) == ["a", "d"]
    assert names(cs.select(any_of=["1boy", "blue hair"])) == ["b", "c"]
    assert names(cs.select(none_of=["sks"])) == ["b", "d", "e"]
    assert names(cs.select(all_of=["red hair"], none_of=["standing"])) == ["c"]
    assert cs.frequency(cs.entries)["smile"] == 2  # counted once per image even when repeated


def test_bulk_edits_then_undo_everything_byte_for_byte(data, capsys):
    original = snapshot(data)
    d = str(data)
    assert main(["tags", "add", d, "--tags", "masterpiece, best quality", "--front", "--any_of", "1girl"]) == 0
    assert tags_of(data, "b")[:3] == ["masterpiece", "best quality", "1girl"]
    assert tags_of(data, "c")[0] == "sks"
    assert main(["tags", "remove", d, "--tags", ".*hair", "--regex"]) == 0
    assert not any("hair" in t for n in "abcd" for t in tags_of(data, n))
    assert main(["tags", "replace", d, "--find", "standing", "--replace_with", "standing, full body"]) == 0
    assert tags_of(data, "a")[-2:] == ["standing", "full body"]
    assert main(["tags", "replace", d, "--find", r"(\w+) quality", "--replace_with", r"\1_q", "--regex", "--scope", "caption"]) == 0
    assert "best_q" in tags_of(data, "a")
    assert main(["tags", "move_front", d, "--tags", "sks", "smile"]) == 0
    assert tags_of(data, "a")[:2] == ["sks", "smile"] and tags_of(data, "b")[0] == "smile"
    assert main(["tags", "dedupe", d]) == 0
    assert tags_of(data, "b").count("smile") == 1
    assert main(["tags", "sort", d, "--sort_by", "alphabetical", "--keep_first", "1"]) == 0
    assert tags_of(data, "d")[1:] == sorted(tags_of(data, "d")[1:], key=str.lower)
    assert main(["tags", "add", d, "--tags", "new", "--none_of", "sks", "1girl", "1boy"]) == 0
    assert tags_of(data, "e") == ["new"]  # a caption file is created for the uncaptioned image
    assert main(["tags", "set", d, "--image", str(data / "c.png"), "--caption", "just, this"]) == 0
    assert tags_of(data, "c") == ["just", "this"]
    assert (data / "c.txt").read_bytes() == b"just, this\nsecond line, outdoors\n"  # the later line is untouched
    assert (data / ".loratrain" / "backup" / "a.txt").read_bytes() == original["a.txt"]

    capsys.readouterr()
    assert main(["tags", "history", d]) == 0
    journalled = len(capsys.readouterr().out.strip().splitlines())
    assert journalled >= 8  # every edit that changed something (dedupe may find nothing left to do)
    for _ in range(journalled):
        assert main(["tags", "undo", d]) == 0
    assert snapshot(data) == original  # byte-identical, and e.txt is gone again
    assert main(["tags", "undo", d]) == 2


def test_dry_run_writes_nothing(data):
    before = snapshot(data)
    assert main(["tags", "add", str(data), "--tags", "x", "--dry_run"]) == 0
    assert snapshot(data) == before and Journal(data).entries() == []


def test_undo_refuses_to_clobber_later_hand_edits(data, capsys):
    assert main(["tags", "add", str(data), "--tags", "x"]) == 0
    (data / "a.txt").write_text("edited by hand", encoding="utf-8")
    assert main(["tags", "undo", str(data)]) == 2
    assert "a.txt" in capsys.readouterr().err
    assert (data / "a.txt").read_text() == "edited by hand"
    assert main(["tags", "undo", str(data), "--force"]) == 0
    assert (data / "a.txt").read_bytes() == CAPTIONS["a"]


def test_crash_midway_leaves_whole_files_and_undo_recovers(data, monkeypatch):
    original = snapshot(data)
    real = journal_mod.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, payload):
        calls["n"] += ".loratrain" not in str(path)  # backups are written first; fail on the 3rd caption
        if calls["n"] == 3:
            raise OSError("disk full")
        real(path, payload)

    monkeypatch.setattr(journal_mod, "atomic_write_bytes", flaky)
    cs = CaptionSet.load(data)
    apply_edit(cs, "add", TagsConfig(dataset_dir=str(data), tags=["x"]))
    with pytest.raises(OSError):
        cs.save("add", "add x")
    monkeypatch.setattr(journal_mod, "atomic_write_bytes", real)
    files = snapshot(data)
    changed = [n for n in files if files[n] != original.get(n)]
    assert 0 < len(changed) < 5  # some written in full, the rest untouched
    assert not list(data.glob(".*.tmp"))
    Journal(data).undo()
    assert snapshot(data) == original


def test_truncate_to_token_budget(data):
    long = ", ".join(f"tag number {i}" for i in range(40))
    (data / "a.txt").write_text(long, encoding="utf-8")
    cs = CaptionSet.load(data)
    apply_edit(cs, "truncate", TagsConfig(dataset_dir=str(data), max_tokens=20, all_of=["tag number 0"]))
    text = cs.text(cs.entry(data / "a.png"))
    assert token_count(text) <= 20 < token_count(text + ", tag number 99")
    assert long.startswith(text)
    cs.save("truncate", "t")
    assert (data / "b.txt").read_bytes() == CAPTIONS["b"]  # filtered out: untouched


def test_not_utf8_caption_is_named(data):
    (data / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConfigError, match="b.txt"):
        CaptionSet.load(data)
