"""ttadapt.keep_freed_memory: a large block freed and asked for again costs no page faults, and
the ``ttadapt`` command turns it on unless TTADAPT_KEEP_FREED_MEMORY=0. Each check runs in a
fresh interpreter (glibc's settings stick to a process); the oracle is the kernel's count of
minor page faults (getrusage)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import ttadapt
import ttadapt.cli as cli
import ttadapt.memory as memory

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                           reason="glibc's allocator only")

# 72 MiB (a block oneDNN's convolution backward asks for on resnet18) written and freed, as in
# every training step: the page faults of steps 13 to 16, with or without the setting, turned on
# before PyTorch is imported, as the command does. (The first steps settle the heap: an aligned
# request asks for a little more than the block it freed, and the thread pool's own allocations
# land between, so the heap may still grow a few times — more often in a process that has imported
# little else; here 4 steps were too few with PyTorch alone, 8 enough.)
_SCRIPT = """
import resource, sys
import ttadapt.memory
kept = ttadapt.memory.keep_freed_memory() if sys.argv[1] == "keep" else None
import torch
n = 72 * 2**20 // 4
for step in range(16):
    if step == 12:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.empty(n).fill_(float(step))
    del block
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(setting: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", _SCRIPT, setting], capture_output=True, text=True, check=True)
    kept, faults = done.stdout.split()
    return kept, int(faults)


@glibc
def test_a_freed_large_block_is_reused_without_page_faults() -> None:
    kept, faults = _faults("keep")
    assert kept == "True"
    assert faults < 200  # of 4 × 18,432 pages (Python's own bookkeeping may fault a few)


@glibc
def test_without_it_glibc_maps_the_block_afresh() -> None:
    """The cost it removes: with glibc's defaults the second block is a fresh mapping (one fault
    per 4 KiB page, or per 2 MiB where transparent huge pages are always on)."""
    _, faults = _faults("default")
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        always_huge = "[always]" in f.read()
    assert faults >= (4 * 30 if always_huge else 4 * 15_000)


def test_exported_and_harmless_to_call_twice() -> None:
    assert ttadapt.keep_freed_memory is memory.keep_freed_memory
    assert memory.keep_freed_memory() == memory.keep_freed_memory()
    assert memory.kept == memory.keep_freed_memory()  # what `ttadapt activations` reports


@pytest.mark.parametrize("value,called", [(None, True), ("1", True), ("0", False), ("off", False), ("no", False)])
def test_the_command_turns_it_on_unless_told_not_to(value, called, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(cli, "app", lambda: None)
    if value is None:
        monkeypatch.delenv("TTADAPT_KEEP_FREED_MEMORY", raising=False)
    else:
        monkeypatch.setenv("TTADAPT_KEEP_FREED_MEMORY", value)
    cli.main()
    assert calls == ([True] if called else [])
