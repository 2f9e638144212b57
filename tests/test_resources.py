"""Machine-dependent defaults: loader workers and test batch size."""
from __future__ import annotations

import pytest

from glocalclip.engine import loaders as R
from glocalclip.apps.parsers import test_parser as make_test_parser, train_parser as make_train_parser


@pytest.mark.parametrize("cpus, processes, expected", [
    (16, 1, 12),   # capped
    (16, 2, 6),    # two torchrun processes share the cores: 8 each, minus main thread and pinning
    (8, 1, 6),
    (3, 1, 1),
    (2, 1, 1),     # never 0 on a GPU: loading in the main thread would serialise it with the GPU
    (1, 4, 1),
])
def test_gpu_workers_leave_two_cores_per_process(cpus, processes, expected):
    assert R.default_num_workers("cuda", cpus=cpus, processes=processes) == expected


@pytest.mark.parametrize("cpus, processes, expected", [(16, 1, 1), (2, 1, 1), (1, 1, 0), (4, 4, 0)])
def test_cpu_workers_keep_cores_for_the_model(cpus, processes, expected):
    assert R.default_num_workers("cpu", cpus=cpus, processes=processes) == expected


def test_torchrun_local_world_size_and_affinity_are_read(monkeypatch):
    monkeypatch.setattr(R.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert R.available_cpus() == 10
    assert R.processes_per_node() == 2
    assert R.default_num_workers("cuda:1") == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "garbage")
    assert R.processes_per_node() == 1


def test_resolve_keeps_explicit_values_and_refuses_bad_ones():
    assert R.resolve_num_workers(0, "cuda") == 0
    assert R.resolve_num_workers(None, "cpu") == R.default_num_workers("cpu")
    assert R.resolve_batch_size(None, "cuda") == R.GPU_TEST_BATCH == 16
    assert R.resolve_batch_size(None, "cpu") == R.CPU_TEST_BATCH
    assert R.resolve_batch_size(3, "cuda") == 3
    with pytest.raises(ValueError, match="num_workers"):
        R.resolve_num_workers(-1, "cpu")
    with pytest.raises(ValueError, match="batch_size"):
        R.resolve_batch_size(0, "cpu")


@pytest.mark.parametrize("parser, flag, value", [
    (make_test_parser, "--batch_size", "0"), (make_test_parser, "--num_workers", "-1"),
    (make_train_parser, "--batch_size", "0"), (make_train_parser, "--epoch", "0"), (make_train_parser, "--num_workers", "-2"),
])
def test_bad_counts_are_refused_by_the_parser(parser, flag, value, capsys):
    required = ["--data_path", "d", "--checkpoint_path", "c"] if parser is make_test_parser else ["--train_data_path", "d"]
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(required + [flag, value])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_unset_counts_parse_as_automatic():
    args = make_test_parser().parse_args(["--data_path", "d", "--checkpoint_path", "c"])
    assert args.batch_size is None and args.num_workers is None
    assert make_train_parser().parse_args(["--train_data_path", "d"]).num_workers is None


MIB = 2**20
BATCH = R.uint8_batch_bytes(16, 518)  # 16 uint8 images [3,518,518] and masks [518,518]: 16.4 MiB


@pytest.mark.parametrize("free, expected", [
    (8 * 1024 * MIB, (12, 4)),   # plenty: as asked
    (1024 * MIB, (12, 2)),       # fewer batches ahead first
    (64 * MIB, (1, 1)),          # Docker's default: then fewer workers
    (30 * MIB, (0, None)),       # not one batch fits in half: load in the main process
])
def test_read_ahead_fits_in_half_the_shared_memory(free, expected):
    plan = R.fit_to_shared_memory(12, 4, BATCH, free_bytes=free)
    assert (plan.num_workers, plan.prefetch_factor) == expected
    if plan.num_workers:
        assert plan.num_workers * plan.prefetch_factor * BATCH <= free // 2
    assert (plan.note is None) == (expected == (12, 4))
    if plan.note:
        assert "--shm-size" in plan.note and f"{free // MIB} MiB free" in plan.note
    assert plan.loader_kwargs() == ({"num_workers": 0} if expected[0] == 0 else
                                    {"num_workers": expected[0], "prefetch_factor": expected[1]})


def test_torchrun_processes_share_the_shared_memory():
    plan = R.fit_to_shared_memory(12, 4, BATCH, free_bytes=8 * 1024 * MIB, processes=8)  # 512 MiB each
    assert (plan.num_workers, plan.prefetch_factor) == (12, 2) and "free for 8 processes" in plan.note


def test_unknown_shared_memory_or_no_workers_change_nothing(monkeypatch):
    monkeypatch.setattr(R, "shared_memory_bytes", lambda path="/dev/shm": None)
    assert R.fit_to_shared_memory(12, 4, BATCH) == R.LoaderPlan(12, 4)
    assert R.fit_to_shared_memory(0, 4, BATCH, free_bytes=0) == R.LoaderPlan(0, None)


class _Items:
    image_size = 518

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i):  # never read: the loaders are only built
        raise AssertionError


def test_test_and_train_loaders_scale_down_on_docker_shared_memory(monkeypatch, capsys):
    from glocalclip.inference.evaluation import evaluation_loader

    batches = [list(range(i, i + 16)) for i in range(0, 64, 16)]
    monkeypatch.setattr(R, "shared_memory_bytes", lambda path="/dev/shm": 64 * MIB)
    loader = evaluation_loader(_Items(), batches, 2, "cpu")
    assert (loader.num_workers, loader.prefetch_factor) == (1, 1)
    assert "raise it with --shm-size" in capsys.readouterr().err
    plan = R.plan_loader(_Items(), [b[:8] for b in batches], 12, prefetch_factor=2)  # training: batch 8
    assert (plan.num_workers, plan.prefetch_factor) == (3, 1)
    assert "12 loader workers x 2 batches ahead of 8.2 MiB" in capsys.readouterr().err
    monkeypatch.setattr(R, "shared_memory_bytes", lambda path="/dev/shm": 64 * 1024 * MIB)
    loader = evaluation_loader(_Items(), batches, 2, "cpu")
    assert (loader.num_workers, loader.prefetch_factor) == (2, 4) and capsys.readouterr().err == ""


def test_feature_cache_auto_goes_where_it_takes_under_half_the_free_memory(monkeypatch):
    import torch

    from glocalclip.engine import feature_cache as FC

    gib = 2**30
    monkeypatch.setattr(FC, "_free_host_bytes", lambda: 16 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert FC.choose_location("auto", 4 * gib, cuda) == "device"  # under half of the GPU's 10 GiB free
    assert FC.choose_location("auto", 5 * gib, cuda) == "host"    # not under half of it, under half of 16
    assert FC.choose_location("auto", 8 * gib, cuda) == "disk"    # under half of neither
    assert FC.choose_location("auto", 7 * gib, cpu) == "host"
    assert FC.choose_location("auto", 8 * gib, cpu) == "disk"
    assert FC.choose_location("device", 1, cpu) == "host"           # no device memory on a CPU run
    assert FC.choose_location("disk", 1, cuda) == "disk" and FC.choose_location("off", 1, cuda) == "off"
    with pytest.raises(ValueError, match="feature_cache"):
        FC.choose_location("gpu", 1, cuda)
