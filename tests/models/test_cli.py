"""The `clipsearch` command: subcommands, the eval report, and clear errors (no tracebacks)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from app.cli import main
from models.checkpoint import save_model_dir
from models.encoder import create_model

from ..conftest import TINY


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "model", "index", "serve", "search", "demo", "bench", "lb-test"):
        assert command in out


def test_version_is_the_installed_package_s(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"clipsearch {importlib.metadata.version('clipsearch')}\n"


def test_eval_reports_recall(shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    loaded = create_model(TINY)
    model_dir = save_model_dir(tmp_path / "model", loaded.model, loaded.model_config,
                               loaded.preprocess_config, {"architecture": TINY})
    code = main(["eval", str(shapes_folder), "--model", str(model_dir), "--quiet",
                 "--json", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["images"] == 192 and report["texts"] == 192
    assert set(report["recall"]) == {f"{d}_R@{k}" for d in ("text_to_image", "image_to_text") for k in (1, 5, 10)}
    for name, (low, high) in report["recall_95ci"].items():
        assert low <= report["recall"][name] <= high
    held = main(["eval", str(shapes_folder), "--model", str(model_dir), "--quiet", "--held-out", "0.25",
                 "--json", str(tmp_path / "held.json")])
    assert held == 0
    assert 0 < json.loads((tmp_path / "held.json").read_text())["images"] < 192


def test_missing_data_is_a_clear_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["eval", str(tmp_path / "nowhere.jsonl"), "--model", TINY, "--quiet"])
    assert code == 2
    assert "no such file or folder" in caplog.text


def test_train_reads_the_training_splits_of_a_karpathy_json_and_eval_the_test_split(
        shapes_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`clipsearch train dataset.json --images-root ...` trained on the test split: the one default,
    evaluation's, served both commands. Training now reads train and restval unless told otherwise."""
    images = sorted(shapes_folder.rglob("*.png"))[:12]
    entries = [{"filename": image.name, "filepath": image.parent.name, "split": split,
                "sentences": [{"raw": image.with_suffix(".txt").read_text().splitlines()[0]}]}
               for image, split in zip(images, ["train", "restval", "test", "val"] * 3, strict=True)]
    (tmp_path / "k.json").write_text(json.dumps({"images": entries}))
    common = ["--images-root", str(shapes_folder), "--model", TINY, "--quiet", "--device", "cpu"]
    assert main(["train", str(tmp_path / "k.json"), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--val-fraction", "0", *common]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_pairs"] == 6 and metrics["held_out_pairs"] == 0  # 3 train + 3 restval
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "k.json"), *common]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 3  # the test split alone
    assert main(["eval", str(tmp_path / "k.json"), "--split", "val,test", *common]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] == 6


def test_eval_json_goes_into_new_folders_and_a_file_in_the_way_is_one_line(
        shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--json into a folder not yet made failed after the scoring; a file where a folder had to be
    ended in a FileExistsError traceback."""
    report = tmp_path / "new" / "deeper" / "report.json"
    assert main(["eval", str(shapes_folder), "--model", TINY, "--quiet", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["images"] == 192
    (tmp_path / "afile").write_text("")
    assert main(["eval", str(shapes_folder), "--model", TINY, "--quiet", "--json", str(tmp_path / "afile" / "r.json")]) == 2
    assert "File exists" in caplog.text and "Traceback" not in caplog.text


def test_train_into_a_file_is_refused(shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "afile").write_text("")
    assert main(["train", str(shapes_folder), "--out", str(tmp_path / "afile"), "--model", TINY, "--quiet"]) == 2
    assert f"the run directory {tmp_path / 'afile'} is a file, not a folder" in caplog.text


def test_train_into_a_folder_of_other_things_is_refused_and_adds_nothing(
        shapes_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`--out ~/Documents` once added checkpoints/, model/ and reports among the user's files."""
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "letter.txt").write_text("hello")
    assert main(["train", str(shapes_folder), "--out", str(folder), "--model", TINY, "--quiet"]) == 2
    assert (f"{folder} holds other things than a training run (letter.txt): train into a new or empty folder, "
            "or into an earlier run's folder to resume it") in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["letter.txt"]


def test_eval_and_train_with_nothing_usable_say_what_was_skipped_before_the_model_loads(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder of images without captions said only "no usable pairs", and only after the model had
    loaded (or failed to download)."""
    from PIL import Image

    import models.encoder

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded for data with nothing to use")

    monkeypatch.setattr(models.encoder, "load_encoder", no_load)
    monkeypatch.setattr(models.encoder, "create_model", no_load)
    (tmp_path / "data").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "a.png")
    expected = (f"{tmp_path / 'data'}: no usable image-caption pairs (skipped: {{'missing_caption': 1}}); "
                "in a folder, each image needs a same-name .txt caption")
    assert main(["eval", str(tmp_path / "data"), "--model", TINY, "--quiet"]) == 2
    assert expected in caplog.text
    caplog.clear()
    assert main(["train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--model", TINY, "--quiet"]) == 2
    assert expected in caplog.text


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.2"])
def test_eval_refuses_a_held_out_fraction_no_run_can_have(shapes_folder: Path, fraction: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """1.5 scored every pair as if held out, and 0 said "no usable pairs" of a readable set."""
    code = main(["eval", str(shapes_folder), "--model", TINY, "--quiet", "--held-out", fraction])
    assert code == 2
    assert f"the held-out fraction must lie in (0, 1), got {float(fraction)}" in caplog.text
    assert "Traceback" not in caplog.text


def test_train_refuses_a_zero_batch_with_a_message(shapes_folder: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """It ended in a ZeroDivisionError traceback."""
    code = main(["train", str(shapes_folder), "--out", str(tmp_path / "run"), "--model", TINY, "--quiet",
                 "--device", "cpu", "--batch-size", "0"])
    assert code == 2
    assert "batch_size must be at least 1, got 0" in caplog.text and "Traceback" not in caplog.text
    assert not (tmp_path / "run").exists()


def test_model_data_only_builds_the_data_and_trains_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """`clipsearch model --data-only` is how a fresh clone gets the held-out set to score the
    committed model on, in seconds: it must build the data and never start training."""
    import models.default_model

    built: list[Path] = []
    monkeypatch.setattr(models.default_model, "build_default_dataset", lambda out: built.append(out) or out / "train.jsonl")

    def no_training(*args, **kwargs):
        raise AssertionError("--data-only started a training run")

    monkeypatch.setattr(models.default_model, "train_default_model", no_training)
    assert main(["model", "--data-only", "--data-dir", str(tmp_path / "data")]) == 0
    assert built == [tmp_path / "data"]
    assert capsys.readouterr().out.strip() == str(tmp_path / "data" / "eval.jsonl")


def test_model_passes_both_cycles_to_the_recipe(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--epochs` sets the first cycle, `--restart-epochs` the optional second, `--precision`,
    `--device` and `--workers` both; unset, the recipe's own (float32 on the CPU, no workers)."""
    import models.default_model

    calls: list[tuple[int, int, str, str, int]] = []

    def record(data_dir: Path, run_dir: Path, epochs: int, restart_epochs: int, progress: bool, precision: str,
               device: str, inner_split: int | None, workers: int, changes: dict, image_bank: bool) -> Path:
        assert inner_split is None and changes == {} and image_bank  # not exported: its bank is its own
        calls.append((epochs, restart_epochs, precision, device, workers))
        return run_dir / "model"

    monkeypatch.setattr(models.default_model, "train_default_model", record)
    assert main(["model", "--no-export", "--quiet", "--run-dir", str(tmp_path), "--epochs", "3", "--restart-epochs", "2",
                 "--precision", "bf16", "--device", "cuda:1", "--workers", "6"]) == 0
    assert main(["model", "--no-export", "--quiet", "--run-dir", str(tmp_path)]) == 0
    assert calls == [(3, 2, "bf16", "cuda:1", 6),
                     (models.default_model.DEFAULT_EPOCHS, models.default_model.RESTART_EPOCHS, "auto", "cpu", 0)]
    assert capsys.readouterr().out.split() == [str(tmp_path / "model")] * 2


@pytest.mark.parametrize(("flags", "got"), [(["--epochs", "0"], "got 0 and 120"),
                                           (["--restart-epochs", "-1"], "got 240 and -1")])
def test_model_refuses_cycles_no_run_can_have(tmp_path: Path, monkeypatch, caplog, flags: list[str],
                                              got: str) -> None:
    """--epochs 0 read as "the recipe's own" and started the whole 240-epoch first cycle."""
    import models.default_model

    def no_training(*args, **kwargs):
        raise AssertionError("trained for a setting that had to be refused")

    monkeypatch.setattr(models.default_model, "train_default_model", no_training)
    assert main(["model", "--no-export", "--quiet", "--run-dir", str(tmp_path), *flags]) == 2
    assert f"--epochs must be at least 1 and --restart-epochs at least 0 (0: no second cycle), {got}" in caplog.text


def test_resuming_with_another_recipe_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A run directory continues only the run it holds: resuming it with another schedule would
    train neither recipe, silently. Where it writes, how often it saves and what it prints may change."""
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    run = ["train", str(data), "--out", str(tmp_path / "run"), "--model", TINY, "--batch-size", "16",
           "--val-fraction", "0.25", "--warmup-steps", "1", "--device", "cpu", "--quiet"]
    assert main([*run, "--epochs", "1"]) == 0
    assert main([*run, "--epochs", "2", "--lr", "1e-3"]) == 2
    assert "epochs 1 -> 2" in caplog.text and "lr 0.0005 -> 0.001" in caplog.text
    assert "Traceback" not in caplog.text
    assert main([*run, "--epochs", "1", "--checkpoint-every", "7"]) == 0
    assert main([*run, "--epochs", "1", "--mixup", "0.2"]) == 2  # mixup is part of the recipe
    assert "mixup_alpha 0.0 -> 0.2" in caplog.text
    mixed = ["train", *run[1:3], str(tmp_path / "mixed"), *run[4:], "--epochs", "1", "--mixup", "0.2"]
    assert main(mixed) == 0
    assert json.loads((tmp_path / "mixed" / "metrics.json").read_text())["config"]["mixup_alpha"] == 0.2
    assert main([*run, "--epochs", "1", "--random-erasing", "0.25"]) == 2  # so is random erasing
    assert "random_erasing 0.0 -> 0.25" in caplog.text


def test_train_distils_a_teacher_given_by_its_directory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    common = [str(data), "--model", TINY, "--batch-size", "16", "--val-fraction", "0.25", "--warmup-steps", "1",
              "--device", "cpu", "--quiet", "--epochs", "1"]
    assert main(["train", *common, "--out", str(tmp_path / "teacher"), "--lock-text"]) == 0
    teacher = tmp_path / "teacher" / "model"
    assert main(["train", *common, "--out", str(tmp_path / "unlocked"), "--teacher", str(teacher)]) == 2
    assert "needs a locked text tower" in caplog.text and "Traceback" not in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "untaught"), "--lock-text", "--distill-weight", "0.3"]) == 2
    assert "--distill-weight and --distill-temperature need --teacher" in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "taught"), "--lock-text", "--teacher", str(teacher),
                 "--distill-weight", "0.3"]) == 0
    config = json.loads((tmp_path / "taught" / "metrics.json").read_text())["config"]
    assert (config["teacher"], config["distill_weight"], config["distill_temperature"]) == (str(teacher), 0.3, 0.05)


def test_train_smooths_the_bank_targets_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    common = [str(data), "--model", TINY, "--batch-size", "16", "--val-fraction", "0.25", "--warmup-steps", "1",
              "--device", "cpu", "--quiet", "--epochs", "1", "--lock-text"]
    assert main(["train", *common, "--out", str(tmp_path / "plain"), "--semantic-temperature", "0.1"]) == 2
    assert "--semantic-temperature needs --semantic-smoothing" in caplog.text and "Traceback" not in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "smoothed"), "--semantic-smoothing", "0.5",
                 "--semantic-temperature", "0.1"]) == 0
    config = json.loads((tmp_path / "smoothed" / "metrics.json").read_text())["config"]
    assert (config["semantic_smoothing"], config["semantic_temperature"]) == (0.5, 0.1)


def test_train_split_seed_holds_out_what_eval_scores_with_that_seed(tmp_path: Path) -> None:
    """`clipsearch train --seed 7 --split-seed 1` holds out the pairs `clipsearch eval --held-out --seed 1` scores."""
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    assert main(["train", str(data), "--model", TINY, "--batch-size", "16", "--val-fraction", "0.25",
                 "--warmup-steps", "1", "--device", "cpu", "--quiet", "--epochs", "1", "--max-steps", "1",
                 "--seed", "7", "--split-seed", "1", "--out", str(tmp_path / "run")]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["config"]["seed"], metrics["config"]["split_seed"]) == (7, 1)
    counts = {}
    for seed in ("1", "7"):
        assert main(["eval", str(data), "--model", str(tmp_path / "run" / "model"), "--quiet", "--held-out", "0.25",
                     "--seed", seed, "--json", str(tmp_path / f"held-{seed}.json")]) == 0
        counts[seed] = json.loads((tmp_path / f"held-{seed}.json").read_text())["texts"]
    assert counts["1"] == metrics["held_out_pairs"] != counts["7"]


def test_a_checkpoint_without_settings_resumes_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Checkpoints written before runs recorded their settings cannot be checked: they still resume,
    and the log says that the settings went unchecked."""
    from models.checkpoint import latest_train_state, load_train_state

    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    run = ["train", str(data), "--out", str(tmp_path / "run"), "--model", TINY, "--batch-size", "16",
           "--val-fraction", "0.25", "--warmup-steps", "1", "--device", "cpu", "--quiet"]
    assert main([*run, "--epochs", "1"]) == 0
    path = latest_train_state(tmp_path / "run")
    assert path is not None
    state = load_train_state(path)
    del state["recipe"]
    torch.save(state, path)
    caplog.clear()
    caplog.set_level(logging.INFO, logger="models.train")
    assert main([*run, "--epochs", "2"]) == 0
    assert "records no training settings" in caplog.text and "resumed from" in caplog.text
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]


def test_model_inner_split_scores_the_experiment_and_never_exports(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--inner-split S` trains into runs/inner-S (unless told otherwise), scores that run's own
    held-out images with and without the caption bank, saves the report there, and leaves
    models/default/ alone."""
    import json

    import models.default_model
    from models.evaluate import EvalReport

    monkeypatch.chdir(tmp_path)
    trained: list[tuple[Path, int | None, dict]] = []

    def record(data_dir: Path, run_dir: Path, epochs: int, restart_epochs: int, progress: bool, precision: str,
               device: str, inner_split: int | None, workers: int, changes: dict, image_bank: bool) -> Path:
        assert image_bank  # an experiment is scored through its own bank
        trained.append((run_dir, inner_split, changes))
        return run_dir / "average"

    def report(model_dir: Path, eval_manifest: Path, inner_split: int, device: str = "cpu",
               caption_bank: bool = True, progress: bool = False) -> EvalReport:
        assert (model_dir, eval_manifest, inner_split) == (Path("runs/inner-2/average"), Path("d/eval.jsonl"), 2)
        return EvalReport({"text_to_image_R@10": 0.6 if caption_bank else 0.5}, images=10, texts=10)

    def no_export(*args, **kwargs):
        raise AssertionError("an inner-split run was exported")

    monkeypatch.setattr(models.default_model, "train_default_model", record)
    monkeypatch.setattr(models.default_model, "inner_split_report", report)
    monkeypatch.setattr(models.default_model, "export_default_model", no_export)
    assert main(["model", "--inner-split", "2", "--data-dir", "d", "--quiet", "--change", "mixup_alpha=0.2"]) == 0
    assert trained == [(Path("runs/inner-2"), 2, {"mixup_alpha": 0.2})]
    saved = json.loads((tmp_path / "runs/inner-2/inner-split.json").read_text())
    assert json.loads(capsys.readouterr().out) == saved
    assert saved["inner_split"] == 2 and saved["model_dir"] == "runs/inner-2/average"
    assert saved["changes"] == {"mixup_alpha": 0.2}  # the experiment says what it changed
    assert saved["with_caption_bank"]["recall"]["text_to_image_R@10"] == 0.6
    assert saved["image_tower_alone"]["recall"]["text_to_image_R@10"] == 0.5


def test_a_changed_recipe_is_never_exported(tmp_path: Path, monkeypatch, caplog: pytest.LogCaptureFixture) -> None:
    """`--change` makes an experiment: without `--inner-split` or `--no-export` it is refused before
    any training, and a malformed change is named."""
    import models.default_model

    monkeypatch.setattr(models.default_model, "train_default_model", lambda *a, **k: pytest.fail("it trained"))
    with pytest.raises(SystemExit, match="a changed recipe is an experiment"):
        main(["model", "--change", "weight_decay=0.1", "--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--change takes KEY=VALUE, not 'weight_decay'"):
        main(["model", "--change", "weight_decay", "--inner-split", "1", "--run-dir", str(tmp_path)])
    assert main(["model", "--change", "lr=1", "--inner-split", "1", "--run-dir", str(tmp_path)]) == 2
    assert "the recipe cannot change lr; it can change lr_scale, weight_decay" in caplog.text


def test_model_builds_the_shipped_image_bank_once_from_the_exported_weights(tmp_path: Path, monkeypatch,
                                                                              capsys) -> None:
    """`make model`: the export stores the tower in float16, so the shipped image bank is built from
    the exported folder (the weights served), from the recipe's data, by the export itself."""
    import models.default_model

    steps: list[tuple] = []

    def train(data_dir: Path, run_dir: Path, image_bank: bool = True, **_: object) -> Path:
        steps.append(("train", data_dir, image_bank))
        return run_dir / "average"

    def export(trained: Path, data_dir: Path | None = None, device: str = "cpu", progress: bool = True) -> Path:
        steps.append(("export", trained, data_dir, device))
        return tmp_path / "default"

    monkeypatch.setattr(models.default_model, "train_default_model", train)
    monkeypatch.setattr(models.default_model, "export_default_model", export)
    monkeypatch.setattr(models.default_model, "attach_image_bank", lambda *a, **k: pytest.fail("a second bank"))
    assert main(["model", "--data-dir", "data", "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    # the float32 average gets no bank of its own: the export builds the one it ships, once
    assert steps == [("train", Path("data"), False), ("export", tmp_path / "run" / "average", Path("data"), "cpu")]
    assert capsys.readouterr().out.split() == [str(tmp_path / "default")]
    steps.clear()  # an experiment is never exported: its model keeps the bank of its own weights
    assert main(["model", "--data-dir", "data", "--run-dir", str(tmp_path / "run"), "--quiet", "--no-export"]) == 0
    assert steps == [("train", Path("data"), True)]


def test_model_image_bank_builds_the_bank_and_trains_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    """`clipsearch model --image-bank DIR` (re)builds a recipe model's image bank from the data it
    was trained on (an inner split's own with --inner-split), in seconds: no training, no export."""
    from collections import Counter

    import models.default_model

    attached: list[tuple] = []

    def attach(model_dir: Path, data_dir: Path, inner_split: int | None, device: str, progress: bool) -> Counter:
        attached.append((model_dir, data_dir, inner_split, device))
        return Counter({"bad_image:truncated": 1})

    monkeypatch.setattr(models.default_model, "attach_image_bank", attach)
    monkeypatch.setattr(models.default_model, "train_default_model", lambda *a, **k: pytest.fail("it trained"))
    monkeypatch.setattr(models.default_model, "export_default_model", lambda *a, **k: pytest.fail("it exported"))
    assert main(["model", "--image-bank", str(tmp_path / "m"), "--data-dir", "pack", "--inner-split", "1",
                 "--quiet"]) == 0
    assert attached == [(tmp_path / "m", Path("pack"), 1, "cpu")]
    out = json.loads(capsys.readouterr().out)
    assert out == {"model_dir": str(tmp_path / "m"), "image_bank": "attached", "skipped": {"bad_image:truncated": 1}}


def test_train_weighs_the_caption_bank_loss_on_request(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ..conftest import make_shapes_folder

    data = make_shapes_folder(tmp_path / "data", per_class=4)
    common = [str(data), "--model", TINY, "--batch-size", "16", "--val-fraction", "0.25", "--warmup-steps", "1",
              "--device", "cpu", "--quiet", "--epochs", "1", "--caption-bank-weight", "0.75"]
    assert main(["train", *common, "--out", str(tmp_path / "unlocked")]) == 2
    assert "--caption-bank-weight needs --lock-text" in caplog.text and "Traceback" not in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "out-of-range"), "--lock-text",
                 "--caption-bank-weight", "2"]) == 2
    assert "caption_bank_weight must lie in [0, 1], got 2.0" in caplog.text
    assert main(["train", *common, "--out", str(tmp_path / "weighted"), "--lock-text"]) == 0
    config = json.loads((tmp_path / "weighted" / "metrics.json").read_text())["config"]
    assert config["caption_bank_weight"] == 0.75
