"""Settings declared once (dataclass fields -> validation and flags), the command overview, and the
help of every flag."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from glocalclip.apps.cli import COMMANDS, main
from glocalclip.apps.parsers import convert_parser, test_parser as make_test_parser, train_parser
from glocalclip.apps.demo import demo_parser
from glocalclip.apps.flags import for_command_line, help_with_default, model_overrides, settings_from_args
from glocalclip.inference.settings import ModelSettings
from glocalclip.apps.predict_cli import PredictConfig, predict_parser
from glocalclip.apps.report import report_parser
from glocalclip.apps.parsers import export_parser
from glocalclip.apps.serve_cli import serve_parser
from glocalclip.engine.settings import TestConfig, TrainConfig
from glocalclip.model.config import BACKBONE_DEFAULTS, GlocalCLIPConfig
from glocalclip.settings import SettingError, settings_fields

REPO = Path(__file__).resolve().parents[1]
PARSERS = {"train": train_parser, "test": make_test_parser, "predict": predict_parser, "convert": convert_parser,
           "report": report_parser, "demo": demo_parser, "export": export_parser, "serve": serve_parser}


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_command_has_a_parser_here():
    assert set(PARSERS) == set(COMMANDS)


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_and_shows_its_default(name):
    parser = PARSERS[name]()
    flags = [a for a in _flags(parser) if a.help is not argparse.SUPPRESS]  # hidden aliases say nothing
    assert len(flags) >= 3
    for action in flags:
        text = help_with_default(action)
        assert action.help and len(action.help) > 8, action.option_strings
        assert action.required or "(default: " in text, (action.option_strings, text)
    shown = " ".join(parser.format_help().split())
    assert shown.count("(default: ") == sum(not a.required for a in flags)


def test_glocalclip_help_lists_the_commands_without_loading_torch():
    code = ("import sys\nfrom glocalclip.apps.cli import main\nrc = main(['--help'])\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch', rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert lines[-1] == "no torch 0", run.stdout + run.stderr
    for name, command in COMMANDS.items():
        assert [line for line in lines if line.split()[:1] == [name]] == [f"  {name:<7}  {command.summary}"]


def test_a_command_s_help_loads_no_torch():
    code = ("import sys\nfrom glocalclip.apps.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.splitlines()[-2:] == ["exit 0", "no torch"], run.stdout + run.stderr
    assert "--train_data_path" in run.stdout


def test_an_unknown_command_is_named(capsys):
    assert main(["trian", "--epoch", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train, test, predict" in err


def test_no_command_prints_the_overview(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_flags_fill_the_dataclass_defaults_exactly():
    """With no optional flag given, the settings are the dataclasses' own defaults (one source)."""
    args = train_parser().parse_args(["--train_data_path", "d"])
    assert settings_from_args(TrainConfig, args) == TrainConfig(train_data_path="d")
    assert TrainConfig().save_path == args.save_path == "./checkpoints/run"
    args = make_test_parser().parse_args(["--data_path", "d", "--checkpoint_path", "c"])
    assert settings_from_args(TestConfig, args) == TestConfig(data_path="d")
    assert settings_from_args(ModelSettings, args) == ModelSettings(checkpoint="c")
    args = predict_parser().parse_args(["--checkpoint_path", "c", "a.png"])
    assert settings_from_args(PredictConfig, args) == PredictConfig(inputs=["a.png"])
    assert settings_from_args(ModelSettings, args) == ModelSettings(checkpoint="c")
    assert model_overrides(args) == {}


@pytest.mark.parametrize("parser, fields", [
    (make_test_parser, {"checkpoint", "sigma", "device", "batch_size"}),
    (predict_parser, {"checkpoint", "model", "sigma", "device", "batch_size"}),
    (serve_parser, {"checkpoint", "model", "sigma", "device", "precision"}),
    (export_parser, {"checkpoint", "sigma"}),
])
def test_which_model_and_how_to_run_it_is_one_dataclass_for_four_commands(parser, fields):
    """predict, serve, test and export take their model flags from ModelSettings: the same help text
    (test and predict set --precision with the other model flags, GlocalCLIPConfig's)."""
    declared = {f.name: info for f, info in settings_fields(ModelSettings)}
    actions = {a.dest: a for a in parser()._actions if a.dest in declared}
    assert set(actions) - {"precision"} == fields - {"precision"}
    for name in fields:
        assert actions[name].help.startswith(declared[name].help.replace("%", "%%")), (name, actions[name].help)


def test_a_model_error_names_the_field_in_python_and_the_flag_on_the_command_line():
    with pytest.raises(SettingError) as e:
        ModelSettings(checkpoint="a.pth", model="b.onnx").one_source("score with")
    assert str(e.value).startswith("give the model to score with: checkpoint CKPT (PyTorch) or model FILE.onnx")
    assert for_command_line(e.value, ModelSettings).startswith("give the model to score with: --checkpoint CKPT")


def test_model_flags_given_only_and_renamed_in_one_place():
    """A model flag not given stays out (the checkpoint's or the backbone's value is used); an
    explicit --pretrained none is None; --dpam fills dpam_layer."""
    base = ["--data_path", "d", "--checkpoint_path", "c"]
    assert model_overrides(make_test_parser().parse_args(base)) == {}
    given = model_overrides(make_test_parser().parse_args(base + ["--pretrained", "none", "--dpam", "7",
                                                             "--features_list", "3", "1", "--cls_ln_post"]))
    assert given == {"pretrained": None, "dpam_layer": 7, "features_list": [3, 1], "cls_ln_post": True}
    renamed = {f.name: info.flag for f, info in settings_fields(GlocalCLIPConfig) if info.flag}
    assert renamed == {"dpam_layer": "dpam"}


@pytest.mark.parametrize("parser, argv, flag", [
    (predict_parser, ["--checkpoint", "c", "a.png", "--batch_size", "0"], "--batch_size"),
    (train_parser, ["--train_data_path", "d", "--n_ctx", "0"], "--n_ctx"),
    (make_test_parser, ["--data_path", "d", "--checkpoint_path", "c", "--metrics", "all"], "--metrics"),
    (train_parser, ["--train_data_path", "d", "--features_list", "6", "0"], "--features_list"),
])
def test_flags_refuse_what_the_field_refuses(parser, argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(batch_size=0), "batch_size must be >= 1, got 0"),
    (lambda: TrainConfig(feature_cache="gpu"), "feature_cache must be one of auto, device, host, disk, off"),
    (lambda: TrainConfig(unmasked_anomalies="drop"), "unmasked_anomalies must be one of"),
    (lambda: TrainConfig(num_workers=-1), "num_workers must be >= 0"),
    (lambda: TestConfig(metrics="all"), "metrics must be one of image-level"),
    (lambda: ModelSettings(batch_size=0), "batch_size must be >= 1"),
    (lambda: ModelSettings(sigma=-1.0), "sigma must be >= 0"),
    (lambda: GlocalCLIPConfig(dpam_layer=0), r"dpam_layer \(--dpam\) must be >= 1"),
    (lambda: GlocalCLIPConfig(precision="fp8"), "precision must be one of fp32, bf16, fp16"),
    (lambda: GlocalCLIPConfig(features_list=()), "at least one vision block"),
])
def test_the_dataclasses_validate_themselves(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_dataset_names_are_made_canonical_in_the_settings():
    from glocalclip.datasets import DatasetError

    assert TrainConfig(dataset="MVTec").dataset == "mvtec" and TestConfig(dataset="VisA").dataset == "visa"
    with pytest.raises(DatasetError, match="unknown dataset name"):
        TestConfig(dataset="imagenet")


def test_the_tiny_backbone_brings_settings_that_fit_it():
    cfg = GlocalCLIPConfig.for_backbone(backbone="tiny")
    assert {k: getattr(cfg, k) for k in BACKBONE_DEFAULTS["tiny"]} == BACKBONE_DEFAULTS["tiny"]
    assert cfg.image_size == 518 and cfg.features_list == (2, 4, 6, 8)
    assert GlocalCLIPConfig.for_backbone(backbone="tiny", n_ctx=7).n_ctx == 7  # a given value wins
    assert GlocalCLIPConfig.for_backbone() == GlocalCLIPConfig()  # ViT-L-14-336: the original's defaults
    with pytest.raises(ValueError, match="unknown GlocalCLIPConfig fields"):
        GlocalCLIPConfig.for_backbone(backbone="tiny", n_context=3)


def test_demo_takes_epoch_and_still_the_old_epochs():
    p = demo_parser()
    assert p.parse_args([]).epoch == 8
    assert p.parse_args(["--epoch", "3"]).epoch == 3 and p.parse_args(["--epochs", "4"]).epoch == 4
    assert "--epochs" not in p.format_help()


CLI_MODULES = {"glocalclip.apps.cli", "glocalclip.cli"}  # the module, and its old path


def _imported_modules(path: Path, source: str | None = None) -> set[str]:
    """Absolute names of every module ``path`` (or ``source`` placed there) imports; ``from X import
    y`` counts X and X.y."""
    package = ["glocalclip", *path.relative_to(REPO / "glocalclip").parent.parts]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
    return found


def test_library_modules_never_import_the_cli():
    """Only the command modules themselves (cli, demo) and ``python -m glocalclip`` reach apps/cli.py,
    however the import is spelled (relative, absolute, ``from .. import cli``, the old path)."""
    allowed = {"apps/cli.py", "apps/demo.py", "__main__.py"}
    offenders = {path.relative_to(REPO / "glocalclip").as_posix()
                 for path in sorted((REPO / "glocalclip").rglob("*.py")) if _imported_modules(path) & CLI_MODULES}
    assert sorted(offenders - allowed) == []
    assert {"apps/demo.py", "__main__.py"} <= offenders  # the check sees an import of the CLI where there is one
    spellings = ["from .cli import x", "from . import cli", "import glocalclip.apps.cli", "from glocalclip import cli"]
    for code in spellings:  # each spelling, as written in glocalclip/apps/ and in glocalclip/
        for where in ("apps/probe.py", "probe.py"):
            modules = _imported_modules(REPO / "glocalclip" / where, code)
            # "from .cli" inside glocalclip/ itself is the old path's module, glocalclip.cli: caught too
            assert modules & CLI_MODULES, (code, where)


def test_every_setting_field_is_a_documented_dataclass_field():
    for cls in (GlocalCLIPConfig, TrainConfig, TestConfig, PredictConfig, ModelSettings):
        declared = {f.name for f, _ in settings_fields(cls)}
        assert declared == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("argv, named, switch", [
    (["predict", "--checkpoint", "c.pt", "{tmp}", "--out", "{tmp}/out", "--shot_weight", "3"],
     "--shot_weight acts", "--reference DIR|GLOB|BANK"),
    (["predict", "--checkpoint", "c.pt", "{tmp}", "--out", "{tmp}/out", "--save_reference", "{tmp}/b.pt",
      "--shot_layers", "selected"], "--save_reference --shot_layers act", "--reference DIR|GLOB|BANK"),
    (["serve", "--checkpoint", "c.pt", "--shot_image_term", "mean"], "--shot_image_term acts",
     "--reference DIR|GLOB|BANK"),
    (["export", "c.pt", "--out", "{tmp}/m.onnx", "--shot_weight", "3", "--shot_image_term", "mean"],
     "--shot_weight --shot_image_term act", "--reference DIR|GLOB|BANK"),
    (["test", "--data_path", "{tmp}", "--checkpoint_path", "c.pt", "--shot_layers", "selected"],
     "--shot_layers acts", "--shots K (1 or more)"),
    (["test", "--data_path", "{tmp}", "--checkpoint_path", "c.pt", "--shots", "0", "--shot_weight", "0"],
     "--shot_weight acts", "--shots K (1 or more)"),
    (["test", "--data_path", "{tmp}", "--checkpoint_path", "c.pt", "--shot_seed", "0"],
     "--shot_seed acts", "--shots K (1 or more)"),
])
def test_few_shot_flags_without_few_shot_are_refused_not_ignored(argv, named, switch, tmp_path, capsys):
    """Before anything is read or written: the checkpoint c.pt does not exist, and no file appears."""
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"error: {named} only with a few-shot bank, and there is none: give {switch} too, or leave " in err
    assert sorted(tmp_path.iterdir()) == []


def test_few_shot_flags_with_few_shot_pass_the_check():
    from glocalclip.apps.flags import given_settings, reference_of, refuse_few_shot_flags_unused
    from glocalclip.model.config import FewShotSettings

    args = predict_parser().parse_args(["--checkpoint", "c", "a.png", "--reference", "good/", "--shot_layers",
                                        "selected", "--save_reference", "b.pt"])
    reference, few_shot = reference_of(args)
    assert (reference.reference, reference.save_reference, few_shot) == ("good/", "b.pt", {"layers": "selected"})
    assert reference_of(predict_parser().parse_args(["--checkpoint", "c", "a.png"]))[1] is None
    args = make_test_parser().parse_args(["--data_path", "d", "--checkpoint_path", "c", "--shots", "2",
                                          "--shot_weight", "3"])
    assert given_settings(FewShotSettings, args) == {"weight": 3.0}
    refuse_few_shot_flags_unused(args, ["weight"], "shots", "K", args.shots > 0)  # no error
    args = make_test_parser().parse_args(["--data_path", "d", "--checkpoint_path", "c"])
    assert settings_from_args(FewShotSettings, args) == FewShotSettings()  # the defaults, as before
    assert settings_from_args(TestConfig, args).shot_seed == 0
    args = make_test_parser().parse_args(["--data_path", "d", "--checkpoint_path", "c", "--shots", "4",
                                          "--shot_seed", "3"])
    assert (settings_from_args(TestConfig, args).shots, settings_from_args(TestConfig, args).shot_seed) == (4, 3)


@pytest.mark.parametrize("extra, says", [
    (["--save_reference", "{tmp}/bank.npz"], "--save_reference {tmp}/bank.npz: a bank's file name ends in .pt, "
     ".pth, .bank, which --reference reads back as a bank (any other name is read as an image)"),
    (["--save_reference", "{tmp}/old.pt"], "--save_reference {tmp}/old.pt exists and is kept: give another name, "
     "or --overwrite_reference to replace it"),
    (["--overwrite_reference"], "--overwrite_reference replaces the file of --save_reference: give "
                                "--save_reference FILE.pt too"),
])
@pytest.mark.parametrize("command", ["predict", "export", "serve"])
def test_save_reference_takes_a_bank_name_and_replaces_a_file_only_when_asked(command, extra, says, tmp_path,
                                                                              capsys):
    """Refused before the checkpoint (c.pt, which does not exist) is read: nothing is written, the old file kept."""
    (tmp_path / "old.pt").write_bytes(b"OLD")
    model = {"predict": ["--checkpoint", "c.pt", "{tmp}", "--out", "{tmp}/out"], "serve": ["--checkpoint", "c.pt"],
             "export": ["c.pt", "--out", "{tmp}/m.onnx"]}[command]
    argv = [command, *model, "--reference", "{tmp}", *extra]
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    assert f"error: {says.replace('{tmp}', str(tmp_path))} (" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["old.pt"] and (tmp_path / "old.pt").read_bytes() == b"OLD"
