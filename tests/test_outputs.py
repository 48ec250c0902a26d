"""isle_fast.outputs: atomic writes, what an output may replace, leftovers of interrupted runs.

The command-line cases (``isle merge --out A.zarr --overwrite`` of an input, ``--json`` into a store,
SIGTERM, kill -9 then a rerun) are in tests/test_reliability.py; these tests pin the rules themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from isle_fast import outputs
from isle_fast.errors import InputError, StoreError
from isle_fast.outputs import (
    JSON_KEY,
    MARKER,
    FolderOutput,
    check_json_output,
    check_output,
    clean_stale,
    commit_dir,
    leftover_note,
    leftovers,
    owned,
    refuse_unsafe,
    temp_path,
    write_bytes,
    write_file,
    write_json,
    write_text,
)


def small_store(path: Path, value: int = 1):
    from isle_fast.stores.stack import create_stack

    w = create_stack(path, kind="gt", classes=["a", "b"], ids=["x"], shapes=[(2, 3)])
    w.write_image(0, np.full((2, 3), value, np.uint8))
    return w.commit()


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leftover_name(final: Path, tag: str, pid: int, host: str | None = None) -> Path:
    return final.with_name(f"{final.name}.{tag}-{host or outputs._host()}-{pid}-0123abcd")


# ----------------------------------------------------------------------------- atomic writes
def test_write_text_json_bytes_replace_atomically_and_leave_no_temporary(tmp_path):
    p = tmp_path / "sub" / "a.txt"
    write_text(p, "one")
    write_text(p, "two", durable=True)
    assert p.read_text() == "two"
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    write_json(tmp_path / "c.json", {"x": 1}, command="isle test")
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["x"] == 1 and doc[JSON_KEY]["command"] == "isle test" and doc[JSON_KEY]["pid"] == os.getpid()
    write_json(tmp_path / "d.json", [1, 2])
    assert json.loads((tmp_path / "d.json").read_text()) == [1, 2]
    assert sorted(q.name for q in tmp_path.rglob("*")) == ["a.txt", "b.bin", "c.json", "d.json", "sub"]


def test_a_failing_writer_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "ckpt.pt"
    p.write_bytes(b"old")

    def boom(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_file(p, boom, durable=True)
    assert p.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["ckpt.pt"]


def test_writing_a_file_over_a_folder_is_an_error_and_leaves_nothing(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="is a folder"):
        write_text(tmp_path / "d", "x")
    assert [q.name for q in tmp_path.iterdir()] == ["d"] and not any((tmp_path / "d").iterdir())


def test_a_link_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    write_text(tmp_path / "link" / "f.txt", "x")
    assert (tmp_path / "real" / "f.txt").read_text() == "x"
    (tmp_path / "f2.txt").write_text("old")
    (tmp_path / "l2.txt").symlink_to(tmp_path / "f2.txt")
    write_text(tmp_path / "l2.txt", "new")
    assert (tmp_path / "l2.txt").is_symlink() and (tmp_path / "f2.txt").read_text() == "new"


# ----------------------------------------------------------------------------- names and leftovers
def test_temporary_names_record_host_and_pid(tmp_path):
    t = temp_path(tmp_path / "K.zarr")
    assert t.parent == tmp_path and t.name.startswith("K.zarr.tmp-")
    t.mkdir()
    (lo,) = leftovers(tmp_path / "K.zarr")
    assert lo.path == t and lo.tag == "tmp" and lo.pid == os.getpid() and lo.host == outputs._host()
    assert lo.state == "running"


def test_clean_stale_removes_only_temporaries_whose_process_is_gone(tmp_path):
    final = tmp_path / "K.zarr"
    gone = leftover_name(final, "tmp", dead_pid())
    mine = leftover_name(final, "tmp", os.getpid())
    elsewhere = leftover_name(final, "tmp", 1, host="another-host")
    legacy = tmp_path / "K.zarr.tmp-0123456789ab"              # the naming before pid and host were recorded
    for d in (gone, mine, elsewhere, legacy):
        d.mkdir()
        (d / "zarr.json").write_text("{}")
    (tmp_path / "K.zarr.tmp-notes.txt").write_text("someone's file")  # not ours: not even a temporary name
    assert clean_stale(final) == [gone]
    assert not gone.exists() and mine.exists() and elsewhere.exists() and legacy.exists()
    note = leftover_note(final)
    assert mine.name in note and elsewhere.name in note and legacy.name in note and "interrupted" in note
    assert "notes.txt" not in note


def test_old_sibling_is_kept_while_it_is_the_only_copy_and_removed_once_replaced(tmp_path):
    final = tmp_path / "E.zarr"
    old = leftover_name(final, "old", dead_pid())
    small_store(old)
    clean_stale(final)                                         # E.zarr is missing: old holds its last version
    assert old.exists()
    assert "rename it back" in leftover_note(final)
    small_store(final)                                         # a new E.zarr is committed
    assert not old.exists()
    assert leftovers(final) == []


def test_missing_store_message_points_at_its_temporary(tmp_path):
    from isle_fast.stores.stack import open_stack

    leftover_name(tmp_path / "K.zarr", "tmp", dead_pid()).mkdir()
    with pytest.raises(StoreError, match=r"K\.zarr does not exist; K\.zarr\.tmp-.* no longer running"):
        open_stack(tmp_path / "K.zarr")


# ----------------------------------------------------------------------------- ownership
def test_owned_knows_what_the_project_wrote(tmp_path):
    store = small_store(tmp_path / "s.zarr").path
    assert owned(store)
    with FolderOutput(tmp_path / "exp", command="isle export") as work:
        (work / "a.png").write_bytes(b"png")
    assert owned(tmp_path / "exp") and (tmp_path / "exp" / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    assert owned(tmp_path / "empty")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    assert not owned(tmp_path / "mine")
    (tmp_path / "notes.json").write_text('{"a": 1}')
    assert not owned(tmp_path / "notes.json")
    write_json(tmp_path / "scores.json", {"a": 1}, command="isle evaluate")
    assert owned(tmp_path / "scores.json")
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / MARKER).write_text("not json")       # a marker must be the project's JSON
    assert not owned(tmp_path / "fake")
    (tmp_path / "link.zarr").symlink_to(store)
    assert owned(tmp_path / "link.zarr")


def test_check_output_refuses_what_the_project_did_not_write_even_with_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    (tmp_path / "notes.txt").write_text("x")
    for p in (tmp_path / "mine", tmp_path / "notes.txt"):
        with pytest.raises(StoreError, match="exists; pass overwrite"):
            check_output(p)
        with pytest.raises(StoreError, match="did not write"):
            check_output(p, overwrite=True)
    assert (tmp_path / "mine" / "data.csv").read_text() == "1,2"
    assert (tmp_path / "notes.txt").read_text() == "x"
    store = small_store(tmp_path / "s.zarr").path
    assert check_output(store, overwrite=True) == Path(store).resolve()
    assert check_output(tmp_path / "new.zarr") == (tmp_path / "new.zarr").resolve()


@pytest.mark.parametrize("where", ["root", "home", "cwd", "parent-of-cwd", "dot"])
def test_special_folders_are_never_outputs(tmp_path, monkeypatch, where):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    path = {"root": "/", "home": str(Path.home()), "cwd": str(work), "parent-of-cwd": str(tmp_path / "a"),
            "dot": "."}[where]
    with pytest.raises(InputError, match="root folder|home folder|working directory"):
        check_output(path, overwrite=True)


def test_inputs_are_never_outputs_whatever_the_spelling(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = small_store(tmp_path / "A.zarr")
    (tmp_path / "link.zarr").symlink_to(tmp_path / "A.zarr")
    (tmp_path / "sub").mkdir()
    for spelling in ("A.zarr", "./A.zarr", str(tmp_path / "A.zarr"), "sub/../A.zarr", "link.zarr", "A.zarr/"):
        with pytest.raises(InputError, match="is an input of this command"):
            check_output(spelling, overwrite=True, inputs=[store])
    with pytest.raises(InputError, match="lies inside the input"):
        check_output("A.zarr/labels/x.zarr", inputs=["A.zarr"])
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / MARKER).write_text(json.dumps({JSON_KEY: {}}))
    small_store(tmp_path / "runs" / "gt.zarr")
    with pytest.raises(InputError, match="holds the input"):
        check_output("runs", overwrite=True, inputs=["runs/gt.zarr"])
    with pytest.raises(InputError, match="is the input"):
        refuse_unsafe("memory://x/A.zarr/", inputs=["memory://x/A.zarr"])
    refuse_unsafe("B.zarr", inputs=[store, "memory://x/A.zarr", None])     # another path is fine


def test_check_json_output_rules(tmp_path):
    store = small_store(tmp_path / "gt.zarr").path
    with pytest.raises(InputError, match="inside the store"):
        check_json_output(Path(store) / "zarr.json")
    with pytest.raises(InputError, match="inside the store"):
        check_json_output(Path(store) / "labels" / "new.json")
    with pytest.raises(InputError, match="is a folder"):
        check_json_output(tmp_path)
    (tmp_path / "paper.json").write_text('{"title": "mine"}')
    with pytest.raises(InputError, match="not written by isle-fast"):
        check_json_output(tmp_path / "paper.json")
    with pytest.raises(InputError, match="another output"):
        check_json_output(tmp_path / "ens.zarr" / "m.json", outputs=[tmp_path / "ens.zarr"])
    write_json(tmp_path / "scores.json", {}, command="isle evaluate")
    check_json_output(tmp_path / "scores.json")                             # an earlier result: replaced
    check_json_output(tmp_path / "new.json")
    assert json.loads((tmp_path / "paper.json").read_text()) == {"title": "mine"}


# ----------------------------------------------------------------------------- folders and commits
def test_folder_output_commits_with_its_marker_or_leaves_nothing(tmp_path):
    with FolderOutput(tmp_path / "rep", command="isle report") as work:
        (work / "tables.md").write_text("|a|")
    assert sorted(q.name for q in (tmp_path / "rep").iterdir()) == [MARKER, "tables.md"]
    assert json.loads((tmp_path / "rep" / MARKER).read_text())[JSON_KEY]["command"] == "isle report"
    with pytest.raises(KeyboardInterrupt):
        with FolderOutput(tmp_path / "rep", command="isle report", overwrite=True) as work:
            (work / "tables.md").write_text("new")
            raise KeyboardInterrupt
    assert (tmp_path / "rep" / "tables.md").read_text() == "|a|"
    with FolderOutput(tmp_path / "rep", command="isle report", overwrite=True) as work:
        (work / "other.md").write_text("new")
    assert sorted(q.name for q in (tmp_path / "rep").iterdir()) == [MARKER, "other.md"]
    assert sorted(q.name for q in tmp_path.iterdir()) == ["rep"]


def test_commit_refuses_what_appeared_meanwhile_and_restores_on_a_failed_rename(tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "f.txt").write_text("someone's")
    with pytest.raises(StoreError, match="appeared while writing"):
        commit_dir(work, tmp_path / "out", overwrite=False)
    with pytest.raises(StoreError, match="did not write"):
        commit_dir(work, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "f.txt").read_text() == "someone's"
    prev = small_store(tmp_path / "s.zarr")
    real_replace = os.replace
    calls = []

    def flaky(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:                                    # the move of the new folder into place fails
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", flaky)
    with pytest.raises(OSError):
        commit_dir(work, tmp_path / "s.zarr", overwrite=True)
    monkeypatch.undo()
    from isle_fast.stores.stack import open_stack

    assert open_stack(prev.path).ids == ["x"]                 # the previous version is back in place
    assert not [q for q in tmp_path.iterdir() if ".old-" in q.name]
