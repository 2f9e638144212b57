"""Machine-dependent defaults: loader workers and test batch size."""
from __future__ import annotations

import pytest

from glocalclip import resources as R
from glocalclip.cli import test_parser as make_test_parser, train_parser as make_train_parser


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
