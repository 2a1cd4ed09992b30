"""A dataset's caption journal is untrusted input: `tags undo` / `tags history` through the real CLI, checked on the disk.

A downloaded dataset can bring `.loratrain/journal/*.jsonl` of its own. Every entry naming a file outside the folder
(`..`, absolute, through a link) or malformed must be refused whole, exit 2, naming the entry, with not one byte changed
inside or outside the dataset. A caption edit that failed partway is listed as incomplete, and undo restores it.
"""
from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
from PIL import Image

import loratrain.dataset_tools.journal as journal_mod
from loratrain.cli import main

CAPTIONS = {"a": b"sks, 1girl, red hair\r\n", "b": b"1girl, blue hair, smile", "c": b"1boy, outdoors\nsecond line\n"}
EVIL = b"pwned by a downloaded dataset\n"


def tree(root: Path) -> dict[str, str]:
    """Every file, folder and link under `root` (links by their target, never followed) and a hash of every file."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def world(tmp_path) -> tuple[Path, Path]:
    """(dataset, outside): a dataset at tmp/work/data with one real journalled edit, and a sentinel folder tmp/outside."""
    data = tmp_path / "work" / "data"
    data.mkdir(parents=True)
    for name, raw in CAPTIONS.items():
        Image.new("RGB", (8, 8)).save(data / f"{name}.png")
        (data / f"{name}.txt").write_bytes(raw)
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"do not touch\n")
    (outside / "deep" / "b.txt").write_bytes(b"nor this\n")
    assert main(["tags", "add", str(data), "--tags", "x"]) == 0  # a genuine entry 000001 under the planted one
    return data, outside


def record(path: str, current: bytes | None = None, before: bytes | None = EVIL) -> dict:
    """A record that undo would act on: `after` matches what is on disk now, so nothing looks like a conflict."""
    return {"path": path, "before": None if before is None else base64.b64encode(before).decode(),
            "after": hashlib.sha256(current if current is not None else b"do not touch\n").hexdigest()}


def plant(data: Path, lines: list, number: int = 2, raw: str | None = None) -> Path:
    journal = data / ".loratrain" / "journal"
    path = journal / f"{number:06d}.jsonl"
    header = {"op": "add", "description": "looks harmless", "time": "2024-01-01 00:00:00"}
    path.write_text(raw if raw is not None else "".join(json.dumps(x) + "\n" for x in [header, *lines]), encoding="utf-8")
    return path


def refused(data: Path, outside: Path, capsys, *needles: str) -> str:
    """Run undo (forced: no conflict check stands in the way) and history; both exit 2 naming entry 000002, and nothing
    inside or outside the dataset changed."""
    before_out, before_in = tree(outside), tree(data)
    capsys.readouterr()
    assert main(["tags", "undo", str(data), "--force"]) == 2
    err = capsys.readouterr().err
    assert "journal entry 000002" in err, err
    for needle in needles:
        assert needle in err, err
    assert "Traceback" not in err
    assert tree(outside) == before_out
    assert tree(data) == before_in
    assert main(["tags", "history", str(data)]) == 2
    assert "journal entry 000002" in capsys.readouterr().err
    assert tree(outside) == before_out and tree(data) == before_in
    return err


def test_dotdot_path_is_refused(world, capsys):
    data, outside = world
    plant(data, [record("../../outside/secret.txt")])
    err = refused(data, outside, capsys)
    assert "journal entry 000002 names a file outside the dataset: '../../outside/secret.txt'" in err


def test_absolute_path_is_refused(world, capsys):
    data, outside = world
    target = str(outside / "secret.txt")
    plant(data, [record(target)])
    refused(data, outside, capsys, f"names a file outside the dataset: {target!r}")


@pytest.mark.parametrize("rel", ["./a.txt", "sub//a.txt", "sub/./a.txt", "sub/../a.txt", "a.txt/", "sub\\a.txt", "~/secret.txt",
                                 "a\x00.txt", "", ".loratrain/journal/000001.jsonl"])
def test_unnormalised_paths_are_refused(world, capsys, rel):
    data, outside = world
    plant(data, [record(rel, current=CAPTIONS["a"])])
    refused(data, outside, capsys, f"names a file outside the dataset: {rel!r}")


def test_symlinked_subfolder_pointing_outside_is_refused(world, capsys):
    data, outside = world
    (data / "sub").symlink_to(outside / "deep", target_is_directory=True)
    plant(data, [record("sub/b.txt", current=b"nor this\n")])
    refused(data, outside, capsys, "'sub/b.txt'")
    assert (outside / "deep" / "b.txt").read_bytes() == b"nor this\n"


def test_record_that_is_a_link_to_outside_is_refused(world, capsys):
    data, outside = world
    (data / "evil.txt").symlink_to(outside / "secret.txt")
    (data / "gone.txt").symlink_to(outside / "created-by-undo.txt")  # a dangling link: undo would create the file
    plant(data, [record("evil.txt"), record("gone.txt", current=None)])
    refused(data, outside, capsys, "'evil.txt'")
    assert not (outside / "created-by-undo.txt").exists()
    plant(data, [record("gone.txt", current=b"")])
    refused(data, outside, capsys, "'gone.txt'")
    assert not (outside / "created-by-undo.txt").exists()


def test_link_that_leaves_and_comes_back_is_refused(world, capsys):
    data, outside = world
    (outside / "back").symlink_to(data, target_is_directory=True)
    (data / "hop").symlink_to(outside, target_is_directory=True)  # hop/back/a.txt is data/a.txt, reached via outside
    plant(data, [record("hop/back/a.txt", current=(data / "a.txt").read_bytes())])
    refused(data, outside, capsys, "'hop/back/a.txt'")


def test_mixed_good_and_bad_records_write_nothing(world, capsys):
    data, outside = world
    good = [record(f"{n}.txt", current=(data / f"{n}.txt").read_bytes(), before=b"good old caption") for n in CAPTIONS]
    plant(data, [*good[:2], record("../../outside/secret.txt"), good[2]])
    refused(data, outside, capsys, "'../../outside/secret.txt'")
    assert all(b"good old caption" not in (data / f"{n}.txt").read_bytes() for n in CAPTIONS)


def test_state_folder_linked_outside_is_refused(world, capsys):
    data, outside = world
    (outside / "journal").mkdir()
    entry = plant(data, [record("a.txt", current=(data / "a.txt").read_bytes())])
    entry.rename(outside / "journal" / entry.name)
    (data / ".loratrain" / "journal" / "000001.jsonl").rename(outside / "journal" / "000001.jsonl")
    (data / ".loratrain" / "journal").rmdir()
    (data / ".loratrain" / "journal").symlink_to(outside / "journal", target_is_directory=True)
    before_out, before_in = tree(outside), tree(data)
    capsys.readouterr()
    for op in ("undo", "history"):
        assert main(["tags", op, str(data)]) == 2
        assert "links outside the dataset folder" in capsys.readouterr().err
    assert main(["tags", "add", str(data), "--tags", "y"]) == 2  # a new edit would write its journal out there
    assert tree(outside) == before_out and tree(data) == before_in


def test_entry_file_that_is_a_link_is_refused(world, capsys):
    data, outside = world
    (outside / "entry.jsonl").write_text(json.dumps({"op": "a", "description": "d", "time": "t"}) + "\n", encoding="utf-8")
    (data / ".loratrain" / "journal" / "000002.jsonl").symlink_to(outside / "entry.jsonl")
    refused(data, outside, capsys, "is malformed: it is a link")


MALFORMED = {
    "not valid JSON": ['{"path": "a.txt", "before": null', "{}"],  # a torn line in the middle is no crash's doing
    "not a JSON object": ['["a.txt", null, "00"]'],
    "has no 'path'": [json.dumps({"before": None, "after": "0" * 64})],
    "has no 'after'": [json.dumps({"path": "a.txt", "before": None})],
    "'path' is not text": [json.dumps({"path": ["..", "x"], "before": None, "after": "0" * 64})],
    "'before' is not valid base64": [json.dumps({"path": "a.txt", "before": "!!not base64!!", "after": "0" * 64})],
    "'before' is neither text nor null": [json.dumps({"path": "a.txt", "before": 7, "after": "0" * 64})],
    "'after' is not a SHA-256": [json.dumps({"path": "a.txt", "before": None, "after": 5})],
    "follows the commit line": ['{"commit": true}', json.dumps(record("a.txt"))],
}


@pytest.mark.parametrize("why", list(MALFORMED))
def test_malformed_records_are_refused(world, capsys, why):
    data, outside = world
    header = json.dumps({"op": "add", "description": "d", "time": "t"})
    plant(data, [], raw="\n".join([header, *MALFORMED[why]]) + "\n")
    refused(data, outside, capsys, "journal entry 000002 is malformed", why)


@pytest.mark.parametrize("raw, why", [("[1, 2]\n", "line 1 is not a JSON object"), ('{"op": 1}\n', "no text 'op'"),
                                      ('{"op": "a", "description": "d", "time": "t", "format": "2"}\n', "'format'"),
                                      ("not json\n", "line 1 is not valid JSON")])
def test_malformed_header_is_refused(world, capsys, raw, why):
    data, outside = world
    plant(data, [], raw=raw)
    refused(data, outside, capsys, "journal entry 000002 is malformed", why)


def test_not_utf8_entry_is_refused(world, capsys):
    data, outside = world
    (data / ".loratrain" / "journal" / "000002.jsonl").write_bytes(b'{"op": "\xff"}\n')
    refused(data, outside, capsys, "is malformed: it is not UTF-8 text")


def test_failed_edit_is_listed_incomplete_and_undo_restores_it(world, capsys, monkeypatch):
    data, _ = world
    after_first = {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS}
    real = journal_mod.atomic_write_bytes
    calls = []

    def disk_full_on_second_caption(path, payload):
        if ".loratrain" not in str(path):  # backups are written first and succeed
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, payload)

    monkeypatch.setattr(journal_mod, "atomic_write_bytes", disk_full_on_second_caption)
    capsys.readouterr()
    assert main(["tags", "add", str(data), "--tags", "y"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    monkeypatch.setattr(journal_mod, "atomic_write_bytes", real)
    now = {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS}
    changed = [n for n in CAPTIONS if now[n] != after_first[n]]
    assert len(changed) == 1 and b"y" in now[changed[0]]  # the first caption was written, the rest untouched

    assert main(["tags", "history", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    first, second = [line for line in lines if line.startswith("00000")]
    assert first.startswith("000001") and "incomplete" not in first
    assert second.startswith("000002") and "[incomplete: failed:" in second and "No space left on device" in second
    assert main(["tags", "history", str(data), "--json"]) == 0
    history = json.loads(capsys.readouterr().out)
    assert [h["status"] for h in history] == ["done", "incomplete"]

    assert main(["tags", "undo", str(data)]) == 0
    assert {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS} == after_first
    assert main(["tags", "undo", str(data)]) == 0
    assert {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS} == CAPTIONS
    capsys.readouterr()
    assert main(["tags", "history", str(data)]) == 0
    assert capsys.readouterr().out.strip() == "no edits to undo"


def test_crash_before_commit_is_listed_incomplete(world, capsys):
    data, _ = world
    entry = data / ".loratrain" / "journal" / "000001.jsonl"
    lines = entry.read_text(encoding="utf-8").splitlines()
    assert lines[-1] == '{"commit": true}'
    entry.write_text("\n".join(lines[:-1]) + '\n{"path": "a.t', encoding="utf-8")  # killed while appending
    capsys.readouterr()
    assert main(["tags", "history", str(data)]) == 0
    assert "[incomplete: interrupted, or still running" in capsys.readouterr().out
    assert main(["tags", "undo", str(data)]) == 0
    assert {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS} == CAPTIONS


def test_journal_without_commit_lines_from_before_is_not_incomplete(world, capsys):
    data, _ = world
    entry = data / ".loratrain" / "journal" / "000001.jsonl"
    lines = [json.loads(x) for x in entry.read_text(encoding="utf-8").splitlines()]
    del lines[0]["format"]
    entry.write_text("".join(json.dumps(x) + "\n" for x in lines[:-1]), encoding="utf-8")  # an older version's entry
    capsys.readouterr()
    assert main(["tags", "history", str(data), "--json"]) == 0
    assert [h["status"] for h in json.loads(capsys.readouterr().out)] == ["done"]
    assert main(["tags", "undo", str(data)]) == 0
    assert {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS} == CAPTIONS


def test_journal_text_cannot_drive_the_terminal(world, capsys):
    data, _ = world
    plant(data, [], raw=json.dumps({"op": "add\x1b[2J", "description": "d\x1b]0;owned\x07", "time": "t\r"}) + "\n")
    capsys.readouterr()
    assert main(["tags", "history", str(data)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert "d\\x1b]0;owned\\x07" in out


def test_entry_torn_while_its_header_was_written_is_harmless(world, capsys):
    data, outside = world
    plant(data, [], raw='{"op": "ad')  # killed inside `begin`: nothing was recorded, nothing written
    before_out = tree(outside)
    capsys.readouterr()
    assert main(["tags", "history", str(data)]) == 0
    assert "(interrupted before it began) [incomplete" in capsys.readouterr().out
    assert main(["tags", "undo", str(data)]) == 0
    assert "0 of 0 file(s) restored" in capsys.readouterr().out
    assert main(["tags", "undo", str(data)]) == 0  # then the real edit below it
    assert {n: (data / f"{n}.txt").read_bytes() for n in CAPTIONS} == CAPTIONS
    assert tree(outside) == before_out
