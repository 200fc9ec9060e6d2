"""`ttadapt bench`: a tiny recipe end to end, resuming, and bad recipes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ttadapt.bench import RecipeError, load_recipe, run_recipe
from ttadapt.cli import app

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
runner = CliRunner()


def test_tiny_recipe_runs_end_to_end_and_resumes(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml")
    seen: list[tuple[str, bool]] = []
    start = time.perf_counter()
    result = run_recipe(recipe, tmp_path, lambda name, skipped: seen.append((name, skipped)))
    assert time.perf_counter() - start < 60
    assert len(seen) == 4 and not any(s for _, s in seen)
    runs = sorted((tmp_path / "runs").glob("*.json"))
    assert [p.name for p in runs] == ["rmsprop-ag1-lr0.001-seed0.json", "rmsprop-ag1-lr0.001-seed1.json",
                                      "rmsprop-grad-lr0.001-seed0.json", "rmsprop-grad-lr0.001-seed1.json"]
    record = json.loads(runs[0].read_text())
    assert len(record["train_loss"]) == 2 and len(record["decrease_ag"]) == 8  # 2 epochs × 4 steps
    assert len(record["l1_ag"]) == len(record["l2_plain"]) == 8
    # AG-1 moves each coordinate by the forecast's magnitude (or not at all where G' = 0); the
    # lengths are read back as float32 differences θ_new − θ, which round (1e-9 relative seen)
    assert all(a <= p * (1 + 1e-6) for a, p in zip(record["l1_ag"], record["l1_plain"]))
    assert sum(record["l1_ag"]) / sum(record["l1_plain"]) > 0.9
    table = (tmp_path / "table.md").read_text()
    assert "| rmsprop | grad |" in table and "| rmsprop | ag1 |" in table and "%" in table
    assert table.count(" ± ") >= 6  # two seeds: mean ± standard error in every accuracy and loss cell
    assert "relative avg. step length L1 / L2" in table
    assert (tmp_path / "curves_rmsprop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "recipe.json").read_text())["name"] == "tiny"
    before = {p.name: p.stat().st_mtime_ns for p in runs}
    seen.clear()
    run_recipe(recipe, tmp_path, lambda name, skipped: seen.append((name, skipped)))
    assert all(s for _, s in seen)  # nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == before
    assert result["best_lr"] == {("rmsprop", "grad"): 1e-3, ("rmsprop", "ag1"): 1e-3}


def test_overrides_and_bad_recipes(tmp_path):
    recipe = load_recipe(RECIPES / "tiny.yaml", ["epochs=1", "methods=[grad, ag3_1]"])
    assert recipe.epochs == 1 and recipe.methods == ["grad", "ag3_1"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nepochz: 3\n")
    with pytest.raises(RecipeError, match="unknown recipe key\\(s\\) epochz; valid keys: name, model"):
        load_recipe(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="unknown method"):
        load_recipe(RECIPES / "tiny.yaml", ["methods=[grad, adam2]"])


@pytest.mark.parametrize("override, message", [
    ("optimizers={rmsprop: {lr: abc}}", "optimizers.rmsprop.lr must be a number > 0 or a non-empty list of them, got 'abc'"),
    ("optimizers={rmsprop: {lr: [0.1, -1]}}", "optimizers.rmsprop.lr must be a number > 0"),
    ("optimizers={lion: {lr: 0.1}}", "optimizers.lion: unknown optimizer 'lion'"),
    ("optimizers={adam: {lr: 0.1, bogus: 1}}", "optimizers.adam options {'bogus': 1}: Adam.__init__() got an unexpected keyword"),
    ("optimizers={}", "optimizers: name at least one"),
    ("ag3_d=0", "ag3_d must be >= 1, got 0"),
    ("sam_rho=-1", "sam_rho must be >= 0, got -1.0"),
    ("max_steps_per_epoch=0", "max_steps_per_epoch must be >= 1 (or null), got 0"),
    ("seeds=0 ag3_d=0", "seeds must be >= 1, got 0; ag3_d must be >= 1, got 0"),
    ("objective=best", "objective: 'best' is not one of 'final_train_loss'"),
    ("model=resnet9", "model: unknown model 'resnet9'"),
    ("data=cifar", "data: unknown dataset 'cifar'"),
    ("model=model_c", "model and data: model_c takes token ids and mnist5k gives 1×28×28 grey images"),
])
def test_a_bad_recipe_is_refused_before_any_run(override, message, tmp_path):
    overrides = override.split(" ") if override.startswith("seeds") else [override]  # (several problems: all named)
    with pytest.raises(RecipeError) as err:
        load_recipe(RECIPES / "tiny.yaml", overrides)
    assert message in str(err.value)
    result = runner.invoke(app, ["bench", str(RECIPES / "tiny.yaml"), "--out", str(tmp_path / "out"), *overrides],
                           terminal_width=300)
    assert result.exit_code == 2 and result.output.strip() == f"error: {err.value}", result.output
    assert not (tmp_path / "out").exists()  # nothing run, nothing written


def test_cli_bench(tmp_path):
    result = runner.invoke(app, ["bench", str(RECIPES / "tiny.yaml"), "--out", str(tmp_path), "--seeds", "1", "epochs=1"],
                           terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "rmsprop" in result.output and (tmp_path / "table.md").is_file()
    table = (tmp_path / "table.md").read_text()
    assert "1 seed (no standard errors)" in table and " ± " not in table  # one seed: no "± 0" claimed
    for args, text in ((["bench", str(tmp_path / "none.yaml")], "does not exist"),
                       (["bench", str(RECIPES / "tiny.yaml"), "epochz=1"], "unknown recipe key"),
                       (["bench", str(RECIPES / "model_c_imdb_rmsprop.yaml"), "--out", str(tmp_path / "c")], "aclImdb")):
        result = runner.invoke(app, args, terminal_width=300)
        assert result.exit_code == 2, (args, result.output)
        assert text in result.output and "Traceback" not in result.output
