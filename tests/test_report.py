"""``glocalclip report``: several runs merged per dataset and setting, mean ± std over seeds; results.md."""
from __future__ import annotations

import statistics

import pytest
import torch

from glocalclip.model.checkpoint_format import make_checkpoint
from glocalclip.apps.report import report_main
from glocalclip.apps.results import results_markdown, write_results

CONFIG = {"backbone": "tiny", "pretrained": None, "image_size": 112, "features_list": [2, 4, 6, 8],
          "dpam_layer": 6, "n_ctx": 12, "ab_ctx": 13, "depth": 10, "t_n_ctx": 2, "multilayer": "reference",
          "cls_ln_post": False, "image_score": "global", "prompt_style": "glocal", "temperature": 0.07,
          "precision": "fp32"}
KEYS = ["pixel_auroc", "pixel_aupro", "image_auroc", "image_ap"]


def fake_results(dataset: str, per_class: dict[str, dict[str, float]], checkpoint: str) -> dict:
    mean = {k: statistics.fmean(m[k] for m in per_class.values()) for k in KEYS}
    return {"dataset": dataset, "data_path": f"/data/{dataset}", "metrics_mode": "image-pixel-level", "sigma": 8.0,
            "metric_keys": KEYS, "classes": per_class, "mean": mean, "n_images": 10, "image_threshold": 0.5,
            "wall_time_s": 3.0, "checkpoint": checkpoint, "config": CONFIG, "versions": {"torch": "x"},
            "total_wall_time_s": 4.0}


def write_run(root, name, dataset, per_class, seed, alpha=1.0):
    """A run folder as train.sh + test.py leave it: checkpoint (train_config inside) + results."""
    ckpt = root / name / "checkpoints" / "epoch_15.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(make_checkpoint(CONFIG, {}, 15, train_config={"seed": seed, "alpha": alpha, "dataset": "mvtec",
                                                            "epoch": 15, "batch_size": 8}), ckpt)
    write_results(fake_results(dataset, per_class, str(ckpt)), root / name / "results" / "nested" / dataset)


def row_of(md: str, dataset: str, setting: str) -> list[str]:
    section = md.split(f"## {dataset}\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells and cells[0] == setting:
            return cells
    raise AssertionError(f"no row {setting!r} in\n{section}")


def expected(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def test_report_merges_two_seeds_with_mean_and_std(tmp_path, capsys):
    a = {"c1": {"pixel_auroc": 0.90, "pixel_aupro": 0.80, "image_auroc": 0.70, "image_ap": 0.60},
         "c2": {"pixel_auroc": 0.94, "pixel_aupro": 0.70, "image_auroc": 0.90, "image_ap": 0.80}}
    b = {"c1": {"pixel_auroc": 0.80, "pixel_aupro": 0.75, "image_auroc": 0.66, "image_ap": 0.50},
         "c2": {"pixel_auroc": 0.86, "pixel_aupro": 0.61, "image_auroc": 0.82, "image_ap": 0.90}}
    write_run(tmp_path, "seed_a", "visa", a, seed=111)
    write_run(tmp_path, "seed_b", "visa", b, seed=222)
    out = tmp_path / "report.md"
    assert report_main([str(tmp_path), "--out", str(out), "--per_class"]) == 0
    printed = capsys.readouterr().out
    md = out.read_text()
    assert md in printed
    row = row_of(md, "visa", "all runs")
    assert row[1] == "2" and row[2] == "111, 222"
    means = {k: [statistics.fmean(r[c][k] for c in r) for r in (a, b)] for k in KEYS}
    # columns: setting, runs, seeds, then per metric ours and the paper's number
    assert row[3:] == [expected(means["pixel_auroc"]), "95.9", expected(means["pixel_aupro"]), "87.2",
                       expected(means["image_auroc"]), "83.7", expected(means["image_ap"]), "86.1"]
    assert row[3] == "87.5 ± 6.4"  # means 92 and 83: (92 + 83) / 2, sample std 9 / sqrt(2)
    per_class = md.split("per class", 1)[1]
    assert f"| c2      | {expected([0.94, 0.86])}" in per_class


def test_report_groups_by_dataset_and_setting(tmp_path, capsys):
    one = {"c": {"pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_auroc": 0.7, "image_ap": 0.6}}
    two = {"c": {"pixel_auroc": 0.7, "pixel_aupro": 0.6, "image_auroc": 0.5, "image_ap": 0.4}}
    write_run(tmp_path, "r1", "visa", one, seed=1, alpha=1.0)
    write_run(tmp_path, "r2", "visa", two, seed=2, alpha=1.0)
    write_run(tmp_path, "r3", "visa", one, seed=1, alpha=0.0)
    write_run(tmp_path, "r4", "mpdd", two, seed=1, alpha=0.0)
    assert report_main([str(tmp_path / "r1"), str(tmp_path / "r2"), str(tmp_path / "r3"),
                        str(tmp_path / "r4")]) == 0
    md = capsys.readouterr().out
    assert row_of(md, "visa", "alpha=1.0")[1:4] == ["2", "1, 2", "80.0 ± 14.1"]
    assert row_of(md, "visa", "alpha=0.0")[1:4] == ["1", "1", "90.0"]  # one run: no std
    assert row_of(md, "mpdd", "alpha=0.0")[3:5] == ["70.0", "96.8"]


def test_report_without_runs_fails_with_a_message(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_results_md_has_paper_config_versions_and_wall_time():
    r = fake_results("mvtec", {"c": {"pixel_auroc": 0.9, "pixel_aupro": 0.8, "image_auroc": 0.95, "image_ap": 0.9}},
                     "/x/epoch_15.pth")
    md = results_markdown(r)
    assert "| image AUROC                  | 95.0    | 91.7    | +3.3" in md
    assert "| n_ctx         | 12" in md and "| torch     | x" in md
    assert "wall time, total: 4.0 s" in md
    assert "reports no number" in results_markdown({**r, "dataset": "mine"})


@pytest.mark.parametrize("values,text", [([0.5], "50.0"), ([None, 0.5, float("nan")], "50.0"), ([], "n/a"),
                                         ([0.1, 0.3], "20.0 ± 14.1")])
def test_mean_std_formatting(values, text):
    from glocalclip.apps.report import fmt_mean_std

    assert fmt_mean_std(values) == text
