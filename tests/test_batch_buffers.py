"""Worker batches through the loader's batch buffers (`zoobot_hpc.batch_buffers`): the pixels that
loading in one process gives, a slot never rewritten while a tensor views it, no slot lost when an
epoch is cut short, and the memory given back after a pass of a loader that does not keep it."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoobot_hpc.data import GalaxyDataset, LoaderSettings

WORKERS, PREFETCH, BATCH = 2, 2, 4
SLOTS = WORKERS * (PREFETCH + 2)


@pytest.fixture(scope="module")
def dataset(demo_frame) -> GalaxyDataset:
    return GalaxyDataset.from_catalog(demo_frame.iloc[:26], None, color=False, size=(96, 96))


@pytest.fixture(scope="module")
def expected(dataset) -> torch.Tensor:
    """Every image as loaded in this process, by row."""
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def make_loader(dataset, keep_buffers: bool, shuffle: bool = True):
    settings = LoaderSettings(batch_size=BATCH, num_workers=WORKERS, prefetch_factor=PREFETCH)
    return settings.loader(dataset, shuffle=shuffle, keep_buffers=keep_buffers)


def test_batches_arrive_in_the_buffers_with_the_pixels_of_their_rows(dataset, expected):
    loader = make_loader(dataset, keep_buffers=True)
    assert loader.buffers is not None and loader.buffers.slots_per_worker == PREFETCH + 2
    rows_seen = []
    for _ in range(3):
        for batch in loader:
            assert loader.buffers.holds(batch["image"])
            assert torch.equal(batch["image"], expected[batch["index"]])
            rows_seen.extend(batch["index"].tolist())
    assert sorted(rows_seen) == sorted(list(range(len(dataset))) * 3)  # the last batch (2) too
    del batch
    assert loader.buffers.slots_held() == 0
    del loader


def test_a_slot_is_not_rewritten_while_a_view_of_its_batch_lives(dataset, expected):
    """Slices of every batch are kept (the batches themselves are dropped): each slot serves one batch,
    later batches take torch's path, and every kept slice still holds its own rows' pixels."""
    loader = make_loader(dataset, keep_buffers=True)
    kept = []
    for _ in range(3):
        for batch in loader:
            kept.append((batch["index"][1:], batch["image"][1:], loader.buffers.holds(batch["image"])))
    del batch
    in_buffers = [held for _, _, held in kept]
    assert sum(in_buffers) == SLOTS and len(in_buffers) == 21
    assert loader.buffers.slots_held() == SLOTS
    for index, images, _ in kept:
        assert torch.equal(images, expected[index])
    kept.clear()
    assert loader.buffers.slots_held() == 0  # freed with the last view
    assert all(loader.buffers.holds(batch["image"]) for batch in loader)  # and used again
    del loader


def test_an_epoch_cut_short_leaves_no_slot_held(dataset, expected):
    """The batches DataLoader discards when the next epoch starts early are freed too."""
    loader = make_loader(dataset, keep_buffers=True)
    for _ in range(3):
        batch = next(iter(loader))
        assert torch.equal(batch["image"], expected[batch["index"]])
    for batch in loader:
        assert loader.buffers.holds(batch["image"])
        assert torch.equal(batch["image"], expected[batch["index"]])
    del batch
    gc.collect()
    assert loader.buffers.slots_held() == 0
    del loader


def resident_kb(address: int) -> int:
    """Resident memory of this process's mapping that contains `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "Rss:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("keep_buffers", [False, True])
def test_a_loader_that_does_not_keep_its_buffers_gives_their_memory_back_after_a_pass(dataset, keep_buffers):
    loader = make_loader(dataset, keep_buffers=keep_buffers, shuffle=False)
    start = loader.buffers._held.ctypes.data
    slot_kb = 96 * 96 * BATCH // 1024
    for batch in loader:
        assert batch["image"].sum() > 0  # (read here: its pages are now mapped in this process too)
    del batch
    if keep_buffers:
        assert resident_kb(start) >= 2 * slot_kb  # each worker's slots at least
    else:
        assert resident_kb(start) <= 4 + slot_kb  # the flags' page and the slot of the batch last held
    del loader


REFUSED_MAPPING = """
import resource, sys
import torch
from zoobot_hpc.data import GalaxyDataset, LoaderSettings
from zoobot_hpc.demo import demo_catalog
from zoobot_hpc.catalog import read_catalog

frame = read_catalog(demo_catalog()).iloc[:10]
dataset = GalaxyDataset.from_catalog(frame, None, color=False, size=(96, 96))
in_use = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (in_use + 2**31, resource.RLIM_INFINITY))
# room for 100,000 images per batch: 2 workers x 4 slots x 0.9 GB, beyond the 2 GB of address space left
loader = LoaderSettings(batch_size=100_000, num_workers=2, prefetch_factor=2).loader(dataset)
assert loader.buffers is None
batch = next(iter(loader))
expected = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
assert torch.equal(batch["image"], expected)
print("loaded", len(batch["index"]))
"""


def test_a_mapping_the_system_refuses_leaves_the_loader_on_torchs_path(tmp_path):
    script = tmp_path / "refused.py"
    script.write_text(REFUSED_MAPPING)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded 10" in result.stdout
    assert "no batch buffers" in result.stderr and "Cannot allocate memory" in result.stderr
