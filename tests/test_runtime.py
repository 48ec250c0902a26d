"""The torch runtime (``isle_fast.training.runtime``): devices, CPU threads, the checkpoint format."""

from __future__ import annotations

import pytest
import torch

from isle_fast.errors import InputError


def test_thread_choice_and_restore():
    import subprocess
    import sys

    from isle_fast.training.runtime import busy_cores, resolve_threads, torch_threads

    cpu = torch.device("cpu")
    n = torch.get_num_threads()
    assert resolve_threads(3, cpu) == 3
    assert resolve_threads(None, cpu, deterministic=True) == n  # reruns must not depend on the load
    assert 1 <= resolve_threads(None, cpu) <= n
    with pytest.raises(InputError, match="^threads must be at least 1"):
        resolve_threads(0, cpu)
    with torch_threads(1) as k:
        assert k == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == n
    # another process spinning on a core is seen as busy (Linux /proc/stat); this one's own work is not
    before = busy_cores(0.2)
    if before is None:
        pytest.skip("no /proc/stat here")
    spin = subprocess.Popen(
        [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"]
    )
    try:
        import time

        time.sleep(0.5)
        assert busy_cores(0.5) > 0.3
    finally:
        spin.kill()
        spin.wait()


def test_thread_governor_follows_the_load():
    import subprocess
    import sys
    import time

    from isle_fast.training.runtime import ThreadGovernor, _usable_cores, busy_cores, torch_threads

    n = torch.get_num_threads()
    off = ThreadGovernor(False, limit=n, period=0.0)
    with torch_threads(1):
        time.sleep(0.05)
        assert off.update() == 1 and torch.get_num_threads() == 1 and off.changes == 0
    if busy_cores(0.05) is None or _usable_cores() < 2:
        pytest.skip("needs /proc/stat and 2 usable cores")
    usable = _usable_cores()
    with torch_threads(usable):
        gov = ThreadGovernor(True, limit=usable, period=0.0)
        spin = subprocess.Popen(
            [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"]
        )
        try:
            time.sleep(0.2)
            gov.update()  # starts a fresh window while the spinner runs
            time.sleep(0.6)
            k = gov.update()
            assert k == torch.get_num_threads() and 1 <= k <= usable - 1  # a core is busy elsewhere
        finally:
            spin.kill()
            spin.wait()
    assert torch.get_num_threads() == n


def test_resolve_device_names_the_setting():
    from isle_fast.refinement.affinity import resolve_device as affinity_device
    from isle_fast.training.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="^device must be auto, cpu or cuda"):
        resolve_device("tpu")
    with pytest.raises(InputError, match="affinity.device must be"):
        resolve_device("tpu", name="affinity.device")
    # the AffinityNet step resolves its device through the same function (a string for its workers)
    assert affinity_device("cpu") == "cpu" and affinity_device(None) in ("cpu", "cuda")
    with pytest.raises(InputError, match="affinity.device"):
        affinity_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA device"):
            resolve_device("cuda")


def test_checkpoints_round_trip_with_weights_only_and_foreign_files_are_named(tmp_path):
    from isle_fast.training.runtime import (
        CHECKPOINT_FORMAT,
        checkpoint_path,
        load_checkpoint,
        write_checkpoint,
    )

    ck = {
        "config": {"backbone": "resnet18"},
        "classes": ["a", "b"],
        "step": 3,
        "model": {"w": torch.arange(6.0).reshape(2, 3)},
    }
    write_checkpoint(ck, tmp_path / "best.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)  # plain tensors and types only
    assert raw["format"] == CHECKPOINT_FORMAT
    back = load_checkpoint(tmp_path / "best.pt")
    assert back["step"] == 3 and torch.equal(back["model"]["w"], ck["model"]["w"])
    assert "format" not in ck  # the caller's dict is not modified
    assert checkpoint_path(tmp_path) == tmp_path / "best.pt"
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt is not an isle-fast"):
        load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="could not read checkpoint .*broken.pt"):
        load_checkpoint(tmp_path / "broken.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no checkpoint"):
        checkpoint_path(tmp_path / "empty")
