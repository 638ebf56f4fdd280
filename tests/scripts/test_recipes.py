"""Every recipe and the main benchmark run end to end in smoke mode, offline; cards validate and agree."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests._helpers.scripts import load_script

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _check_card_and_json(out: Path, metric: str) -> None:
    from huggingface_hub import ModelCard

    results = json.loads((out / "results.json").read_text())
    card = ModelCard.load(out / "README.md")
    entries = card.data.eval_results
    assert entries, "model-index results missing"
    by_opt = {e.metric_name.split("(")[-1].rstrip(")"): e.metric_value for e in entries}
    for run in results["runs"]:
        assert by_opt[run["optimizer"]] == pytest.approx(run["final"][f"eval_{metric}"])
    assert results["meta"]["command"] in card.text
    assert results["meta"]["code"].startswith("hf_qn ")
    assert (out / "comparison.png").stat().st_size > 1000
    assert results["summary"]["verdict"] in card.text


COMMON = ["--smoke", "true", "--max_steps", "4", "--per_device_train_batch_size", "8", "--eval_strategy", "steps",
          "--eval_steps", "2", "--logging_steps", "2", "--save_strategy", "no", "--report_to", "none",
          "--use_cpu", "true", "--disable_tqdm", "true", "--optimizers", "adamw", "kbfgs", "mlbfgs"]


@pytest.mark.parametrize(
    ("script", "extra", "metric"),
    [
        ("text_classification", [], "accuracy"),
        ("causal_lm", ["--block_size", "16"], "perplexity"),
        ("causal_lm", ["--block_size", "16", "--model_type", "llama"], "perplexity"),
        ("image_classification", ["--model_type", "vit"], "accuracy"),
        ("image_classification", ["--model_type", "resnet"], "accuracy"),
    ],
)
def test_recipe_smoke(tmp_path, script, extra, metric):
    mod = load_script(script)
    out = tmp_path / script
    res = mod.main([*COMMON, *extra, "--output_dir", str(out)])
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "kbfgs", "mlbfgs"]
    assert all(r["global_step"] == 4 for r in res["runs"])
    _check_card_and_json(out, metric)
    model = json.loads((out / "results.json").read_text())["meta"]["model"]
    assert model.split(",")[0] in (out / "README.md").read_text()  # the card names what was trained
    if "llama" in extra:  # the model saved beside the card is the Llama the runs trained
        assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
        assert model.startswith("LlamaForCausalLM, 0.") and model.endswith("built from its config")
        with pytest.raises(ValueError, match="--model_type 'bert': gpt2 or llama"):
            mod.main([*COMMON, "--model_type", "bert", "--output_dir", str(tmp_path / "bert")])


def test_a_lora_recipe_trains_peft_adapters_and_saves_an_adapter_repository(tmp_path):
    """--lora_r: every optimizer trains peft's LoRA adapters (and the new head); the folder holds the best run's
    adapter, loadable by peft, and the card says what was trained."""
    mod = load_script("text_classification")
    out = tmp_path / "lora"
    res = mod.main([*COMMON, "--lora_r", "4", "--lora_target_modules", "query", "value", "--output_dir", str(out)])
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "kbfgs", "mlbfgs"]
    _check_card_and_json(out, "accuracy")
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"query", "value"}
    from peft import PeftConfig

    assert PeftConfig.from_pretrained(str(out)).r == 4  # peft reads the folder back
    assert "LoRA adapters (peft), r=4" in (out / "README.md").read_text()
    kbfgs = next(r for r in res["runs"] if r["optimizer"] == "kbfgs")
    assert kbfgs["optimizer_statistics"]["qn/pairs_accepted"] > 0
    with pytest.raises(ValueError, match="--lora_r"):
        mod.RecipeArguments(lora_r=-1)


def test_wiki_next_sentence_pairs_are_real_neighbours_or_from_another_article():
    """Positive pairs are consecutive sentences of one article, negative pairs a sentence and one of another
    article, half and half; the pairs are the same for the same seed."""
    mod = load_script("text_classification")
    articles = ["\n".join(f"Article {a} sentence number {i} is here." for i in range(12)) for a in range(3)]
    first, second, labels = mod.next_sentence_pairs(articles, 40, seed=0)
    assert labels == [1, 0] * 20
    for a, b, y in zip(first, second, labels):
        (art_a, i), (art_b, j) = ((w[1], int(w[4])) for w in (a.split(), b.split()))
        assert (art_a == art_b and j == i + 1) if y else art_a != art_b
    assert mod.next_sentence_pairs(articles, 40, seed=0) == (first, second, labels)
    with pytest.raises(ValueError, match="--builtin"):
        mod.DataArguments(builtin="imdb")


def test_wiki_next_sentence_recipe_runs_on_held_out_articles(tmp_path):
    """The recipe on the Wikipedia pairs: tokenized as pairs, test pairs from the held-out articles only."""
    mod = load_script("text_classification")
    data = mod.DataArguments(builtin="wiki_next_sentence", train_pairs=30, test_pairs=20)
    train, test = mod.load_data(data, seed=0)
    assert (len(train), len(test)) == (30, 20) and sum(test["label"]) == 10
    assert not set(train["text"]) & set(test["text"])  # whole articles held out
    out = tmp_path / "nsp"
    args = [a for a in COMMON if a != "mlbfgs"]
    res = mod.main([*args, "--builtin", "wiki_next_sentence", "--train_pairs", "32", "--test_pairs", "16",
                    "--output_dir", str(out)])
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "kbfgs"]
    _check_card_and_json(out, "accuracy")


def test_lr_sweep_keeps_the_best_candidate_and_records_the_grid(tmp_path):
    mod = load_script("image_classification")
    out = tmp_path / "sweep"
    args = [a for a in COMMON if a not in ("kbfgs", "mlbfgs")]
    res = mod.main([*args, "--model_type", "resnet", "--lr_sweep", "adamw=1e-4,3e-3", "--lr_sweep_extend", "0",
                    "--output_dir", str(out)])
    (run,) = res["runs"]
    finals = {t["learning_rate"]: t["final"] for t in run["sweep"]}
    assert sorted(finals) == [1e-4, 3e-3]
    assert run["final"]["eval_accuracy"] == max(finals.values())
    assert finals[run["learning_rate"]] == run["final"]["eval_accuracy"]
    _check_card_and_json(out, "accuracy")
    assert "best of 0.0001, 0.003" in (out / "README.md").read_text()


def test_sweep_seeds_choose_the_lr_by_its_seed_mean_and_count_as_repeats(tmp_path):
    """--sweep_seeds 2: every candidate trains seeds s and s+1, the lr with the best mean is kept, its two runs are
    the first two seeds of the table's mean (not trained again) and --repeats 3 adds only seed s+2."""
    mod = load_script("image_classification")
    args = [a for a in COMMON if a not in ("kbfgs", "mlbfgs")]
    out = tmp_path / "sweep"
    res = mod.main([*args, "--model_type", "resnet", "--lr_sweep", "adamw=1e-4,3e-3", "--sweep_seeds", "2",
                    "--lr_sweep_extend", "0", "--repeats", "3", "--output_dir", str(out)])
    (run,) = res["runs"]
    means = {t["learning_rate"]: t["final_mean"] for t in run["sweep"]}
    assert [t["seeds"] for t in run["sweep"]] == [2, 2]
    assert means[run["learning_rate"]] == max(means.values())
    assert [r["seed"] for r in run["repeats"]] == [run["seed"] + 1, run["seed"] + 2]
    seed01 = [run["final"]["eval_accuracy"], run["repeats"][0]["final"]["eval_accuracy"]]
    assert sum(seed01) / 2 == pytest.approx(means[run["learning_rate"]])
    _check_card_and_json(out, "accuracy")
    assert "best mean of 2 seeds among 0.0001, 0.003" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="--sweep_seeds"):
        mod.main([*args, "--sweep_seeds", "0", "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(ValueError, match="--lr_sweep_extend"):
        mod.main([*args, "--lr_sweep_extend", "-1", "--output_dir", str(tmp_path / "bad")])


def test_a_best_lr_at_an_end_of_the_grid_is_extended_beyond_it(tmp_path, monkeypatch):
    """A best lr at an end of its grid gets a candidate a factor of 3 beyond that end, up to --lr_sweep_extend times:
    with the metric peaking at lr 0.02, the grid 1e-3, 3e-3 grows upward until the best is interior (after 3
    extensions) or the budget runs out (2: the card says the lr kept is still at an end)."""
    mod = load_script("image_classification")
    utils = sys.modules["recipe_utils"]
    train, order = utils._train, []

    def peaked(args, name, lr, *rest):  # a real run whose final metric is replaced by a known function of lr
        order.append(lr)
        run, model = train(args, name, lr, *rest)
        run["final"]["eval_accuracy"] = 1.0 - abs(math.log10(lr / 0.02)) / 10
        return run, model

    monkeypatch.setattr(utils, "_train", peaked)
    args = [a for a in COMMON if a not in ("kbfgs", "mlbfgs")]
    for extend, grown, kept in (("2", [9e-3, 0.027], 0.027), ("3", [9e-3, 0.027, 0.081], 0.027)):
        order.clear()
        out = tmp_path / f"extend{extend}"
        res = mod.main([*args, "--model_type", "resnet", "--lr_sweep", "adamw=1e-3,3e-3", "--lr_sweep_extend", extend,
                        "--output_dir", str(out)])
        (run,) = res["runs"]
        assert order == [1e-3, 3e-3, *grown]
        assert [t["learning_rate"] for t in run["sweep"]] == sorted(order)
        assert run["learning_rate"] == kept
        card = (out / "README.md").read_text()
        assert ("at an end of the grid" in card) == (extend == "2")


def test_lr_beyond_best_end():
    sys.path.insert(0, str(ROOT / "scripts"))
    from recipe_utils import lr_beyond_best_end

    assert lr_beyond_best_end({1e-3: -0.9, 3e-3: -0.8}) == pytest.approx(3.3e-4)  # best at the low end
    assert lr_beyond_best_end({1e-3: -0.7, 3e-3: -0.8}) == pytest.approx(9e-3)  # at the high end
    assert lr_beyond_best_end({1e-3: -0.7, 3e-3: -0.8, 1e-2: -0.75}) is None  # interior
    assert lr_beyond_best_end({1e-3: math.inf, 3e-3: math.inf}) == pytest.approx(3.3e-4)  # all diverged: lower
    assert lr_beyond_best_end({1e-3: -0.8}) is None  # no sweep
    assert lr_beyond_best_end({}) is None


def test_the_optimizers_take_turns_seed_by_seed(tmp_path, monkeypatch):
    """Seed s of every candidate lr of every optimizer trains before seed s + 1 of any, sweeps and repeats alike,
    so that machine load hits the optimizers whose times are compared alike."""
    mod = load_script("image_classification")
    utils = sys.modules["recipe_utils"]
    order, train = [], utils._train

    def recording(args, name, lr, *rest):
        order.append((name, lr, args.seed))
        return train(args, name, lr, *rest)

    monkeypatch.setattr(utils, "_train", recording)
    args = [a for a in COMMON if a != "mlbfgs"]
    res = mod.main([*args, "--model_type", "resnet", "--lr_sweep", "adamw=1e-4,3e-3", "--sweep_seeds", "2",
                    "--lr_sweep_extend", "0", "--learning_rates", "kbfgs=1e-3", "--repeats", "3", "--seed", "0",
                    "--output_dir", str(tmp_path / "turns")])
    best = res["runs"][0]["learning_rate"]
    assert order == [("adamw", 1e-4, 0), ("adamw", 3e-3, 0), ("kbfgs", 1e-3, 0),
                     ("adamw", 1e-4, 1), ("adamw", 3e-3, 1), ("kbfgs", 1e-3, 1),
                     ("adamw", best, 2), ("kbfgs", 1e-3, 2)]
    assert [[r["seed"] for r in run["repeats"]] for run in res["runs"]] == [[1, 2], [1, 2]]


def test_lr_sweep_rejects_bad_entries():
    sys.path.insert(0, str(ROOT / "scripts"))
    from recipe_utils import parse_lr_sweep

    assert parse_lr_sweep(["adamw=1e-4,1e-3"]) == {"adamw": [1e-4, 1e-3]}
    for bad in ("adam=1e-3", "adamw", "adamw=", "adamw=fast"):
        with pytest.raises(ValueError, match="--lr_sweep"):
            parse_lr_sweep([bad])


def test_optimizer_variants_are_named_rows_with_their_own_hyperparameters(tmp_path):
    """``kbfgs:output_side=kfac`` is an optimizer of its own in --optimizers, --learning_rates and --lr_sweep (its
    name has "=" signs too); its hyperparameters override --qn_args; bad variants are refused, naming the fix."""
    from hf_qn import QNTrainingArguments

    utils = load_script("recipe_utils")
    assert utils.split_optimizer("kbfgs:output_side=kfac,damping=0.5") == ("kbfgs", {"output_side": "kfac",
                                                                                  "damping": 0.5})
    assert utils.split_optimizer("adamw") == ("adamw", {})
    for bad, why in (("adamw:lr=1", "only"), ("kbfgs:", "none given"), ("kbfgs:history=3", "unknown: history"),
                     ("mlbfgs:output_side=kfac", "unknown: output_side"), ("adam", "choose from")):
        with pytest.raises(ValueError, match=why):
            utils.split_optimizer(bad)
    variant = "kbfgs:output_side=kfac,damping=0.5"
    assert utils.parse_lr_sweep([f"{variant}=1e-3,3e-3", "kbfgs=1e-2"]) == {variant: [1e-3, 3e-3], "kbfgs": [1e-2]}
    assert utils.parse_learning_rates([f"{variant}=0.01"], {"kbfgs": 3e-3}) == {"kbfgs": 3e-3, variant: 0.01}
    with pytest.raises(ValueError, match="--lr_sweep"):
        utils.parse_lr_sweep(["kbfgs:nonsense=1=1e-3"])
    base = QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                               qn_args="damping=0.2,update_interval=10")
    args = utils.optimizer_args(base, variant, 0.1, str(tmp_path / "v"))
    assert args.qn_optimizer == "kbfgs"
    assert args.qn_args == {"damping": 0.5, "update_interval": 10, "output_side": "kfac"}
    recipe = utils.RecipeArguments(optimizers=["adamw", "kbfgs", variant])
    names, lrs = utils.comparison_plan(recipe, base, {"adamw": 1e-3, "kbfgs": 3e-3})
    assert names == ["adamw", "kbfgs", variant] and lrs[variant] == 3e-3  # its base's default lr
    with pytest.raises(ValueError, match="each optimizer"):
        utils.comparison_plan(utils.RecipeArguments(optimizers=["kbfgs", "kbfgs"]), base, {"kbfgs": 3e-3})


def test_a_variant_trains_beside_its_base_optimizer(tmp_path):
    """A recipe run with kbfgs and kbfgs:output_side=bfgs: two rows, the variant's optimizer built with BFGS's
    output side (its hyperparameters in results.json) where the defaults take K-FAC's on this model built from a
    config, both in the card."""
    mod = load_script("image_classification")
    out = tmp_path / "variants"
    args = [a for a in COMMON if a != "mlbfgs"] + ["kbfgs:output_side=bfgs"]
    res = mod.main([*args, "--model_type", "resnet", "--output_dir", str(out)])
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "kbfgs", "kbfgs:output_side=bfgs"]
    assert [r["qn_args"].get("output_side") for r in res["runs"]] == [None, None, "bfgs"]
    assert [r["output_side"] for r in res["runs"]] == [None, "kfac", "bfgs"]  # as "auto" resolved it
    assert "- `K-BFGS rows' output factor`: `{'kbfgs': 'kfac', 'kbfgs:output_side=bfgs': 'bfgs'}`" in (
        out / "README.md").read_text()
    assert res["runs"][2]["optimizer_statistics"] != res["runs"][1]["optimizer_statistics"]
    _check_card_and_json(out, "accuracy")


def test_one_qn_args_serves_every_optimizer_compared(tmp_path):
    """A recipe's --qn_args reaches each optimizer with the entries it takes: preset=paper to K-BFGS only,
    mL-BFGS's normalize to mL-BFGS only, a name both have (lr) to both; AdamW gets none."""
    from hf_qn import QNTrainingArguments

    utils = load_script("recipe_utils")
    base = QNTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                               qn_args="preset=paper,update_interval=10,normalize=unit")
    got = {name: utils.optimizer_args(base, name, 0.1, str(tmp_path / name)) for name in ("kbfgs", "mlbfgs", "adamw")}
    assert got["kbfgs"].qn_args == {"preset": "paper", "update_interval": 10}
    assert got["mlbfgs"].qn_args == {"update_interval": 10, "normalize": "unit"}
    assert (got["adamw"].qn_optimizer, got["adamw"].qn_args) == (None, {})
    assert got["adamw"].optim == "adamw_torch_fused"  # the Trainer's fastest AdamW, its own default: a fair peer
    assert [got[n].learning_rate for n in got] == [0.1, 0.1, 0.1]


def test_text_classification_reads_the_real_shipped_sentences():
    mod = load_script("text_classification")
    texts, labels = mod.load_pang_lee()
    assert len(texts) == 200 and sum(labels) == 100
    assert all(isinstance(t, str) and t for t in texts)


def test_benchmark_smoke(tmp_path):
    mod = load_script("benchmark_autoencoder")
    out = mod.main(["--smoke", "true", "--budgets", "1", "2", "--sweep_seconds", "0", "--output_dir", str(tmp_path),
                    "--optimizers", "kbfgs", "kbfgs_l", "kbfgs_consecutive", "mlbfgs", "adamw"])
    names = [r["optimizer"] for r in out["results"]]
    assert names == ["kbfgs", "kbfgs_l", "kbfgs_consecutive", "mlbfgs", "adamw"]
    assert all(r["error"] is None and r["params_finite"] for r in out["results"])
    assert (tmp_path / "loss_curves.png").exists() and (tmp_path / "results.md").exists()
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "README.md")
    assert len(card.data.eval_results) == 5


@pytest.mark.parametrize(("reaches", "pace"), [
    ([9.0], "one run each: the run-to-run spread is not measured, so no verdict; --repeats 3 measures it"),
    ([9.0, 8.5, 9.5], "faster: 0.85-0.95x over 3 runs each"),
    ([9.0, 10.5], "within noise: 0.90-1.05x over 2 runs each"),
    ([10.2, 11.0], "slower: 1.02-1.10x over 2 runs each"),
    ([9.0, 8.0, None], "within noise: 0.80-0.90x in 2 of 3 runs, never in 1"),
    ([11.0, None], "slower: 1.10x in 1 of 2 runs, never in 1"),
])
def test_summary_verdict_only_beyond_the_run_to_run_spread(reaches, pace):
    """"faster" or "slower" only when every repeat says so, with the spread shown; one run gives no verdict; a
    repeat that never reached AdamW's final (None) is counted, not printed as an infinite ratio."""
    utils = load_script("recipe_utils")

    def run(name, final, evals, seconds):
        return {"optimizer": name, "learning_rate": 1e-3, "final": {"eval_loss": final}, "evals": evals,
                "train_seconds": seconds, "median_step_seconds": 0.1}

    adam = [run("adamw", 1.0, [{"eval_loss": 1.0, "seconds": 10.0}], 10.0) for _ in reaches]
    qn = [run("mlbfgs", 0.9, [{"eval_loss": 1.5, "seconds": 5.0}] + ([] if t is None else [{"eval_loss": 1.0, "seconds": t}]),
              12.0) for t in reaches]
    runs = [{**adam[0], "repeats": adam[1:]}, {**qn[0], "repeats": qn[1:]}]
    verdict = utils.summarize(runs, "eval_loss", greater=False)["verdict"]
    assert f"({pace})." in verdict and f"{reaches[0] / 10:.2f}x" in verdict


def test_recipe_honours_the_standard_flags_resumes_and_saves_the_model(tmp_path):
    """--qn_optimizer alone picks the optimizer, --learning_rate its lr; the best run's model and tokenizer are
    saved beside the card; --resume_from_checkpoint continues a run from its checkpoint instead of starting
    over."""
    mod = load_script("causal_lm")
    out = tmp_path / "lm"
    base = [a for a in COMMON if a not in ("--optimizers", "adamw", "kbfgs", "mlbfgs", "--save_strategy", "no")]
    args = [*base, "--block_size", "16", "--qn_optimizer", "mlbfgs", "--learning_rate", "0.002",
            "--save_strategy", "steps", "--save_steps", "2", "--output_dir", str(out)]
    res = mod.main(args)
    (run,) = res["runs"]
    assert (run["optimizer"], run["learning_rate"]) == ("mlbfgs", 0.002)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    assert (out / "tokenizer.json").exists() and res["meta"]["model_saved_from"] == "mlbfgs"
    resumed = mod.main([*[a if a != "4" else "6" for a in args], "--resume_from_checkpoint", "true"])
    (again,) = resumed["runs"]
    assert again["global_step"] == 6
    assert {e["step"] for e in run["evals"]} == {2, 4}
    assert {e["step"] for e in again["evals"]} == {6}  # it continued from step 4: nothing before was run again


def test_push_is_checked_before_any_training(tmp_path):
    mod = load_script("image_classification")
    args = [*COMMON, "--model_type", "resnet", "--output_dir", str(tmp_path / "p"), "--push_card_to_hub", "true"]
    with pytest.raises(ValueError, match="--hub_model_id"):
        mod.main(args)
    with pytest.raises(RuntimeError, match="cannot be reached or you are not logged in"):
        mod.main([*args, "--hub_model_id", "someone/somewhere"])
    assert not (tmp_path / "p" / "runs").exists()  # nothing trained


def test_quick_demo_preset_keeps_its_budgets_and_reports_real_step_times(tmp_path):
    """``make demo``'s preset: its optimizers and budgets unless given; every run stops at its budget (the last
    step starts before it runs out) and reports a finite step time, even a run of one step."""
    import math

    mod = load_script("benchmark_autoencoder")
    out = mod.main(["--preset", "quick", "--smoke", "true", "--budgets", "1", "2", "--output_dir", str(tmp_path)])
    assert [r["optimizer"] for r in out["results"]] == ["adamw", "kbfgs_int10", "kbfgs", "mlbfgs"]
    assert out["meta"]["args"]["sweep_seconds"] == 0 and out["meta"]["args"]["budgets"] == [1.0, 2.0]
    for r in out["results"]:
        last = r["steps"][-1]
        assert math.isfinite(r["median_step_seconds"]) and last["seconds"] - last["step_seconds"] < 2.0
    with pytest.raises(ValueError, match="--preset"):
        mod.main(["--preset", "huge", "--smoke", "true", "--output_dir", str(tmp_path)])


def test_seed_averaged_summary_uses_the_mean_curve_of_every_seed():
    """With repeats, the table's mean final and the time to AdamW's mean final come from the curves averaged over
    the seeds (evaluation i of each seed), not from the first seed alone."""
    utils = load_script("recipe_utils")

    def run(name, evals, seconds):
        return {"optimizer": name, "learning_rate": 1e-3, "final": {"eval_accuracy": evals[-1][1]},
                "evals": [{"eval_accuracy": a, "seconds": t} for t, a in evals], "train_seconds": seconds,
                "median_step_seconds": 0.1}

    adam = [run("adamw", [(5.0, 0.5), (10.0, 0.8)], 10.0), run("adamw", [(5.0, 0.6), (10.0, 0.9)], 10.0)]
    # seed 0 reaches 0.8 (its AdamW's final) at 4 s; seed 1 only 0.7 by 4 s: the mean 0.75 < AdamW's mean 0.85
    qn = [run("kbfgs", [(4.0, 0.8), (8.0, 0.84), (12.0, 0.9)], 12.0),
          run("kbfgs", [(4.0, 0.7), (8.0, 0.88), (12.0, 0.9)], 12.0)]
    runs = [{**adam[0], "repeats": adam[1:]}, {**qn[0], "repeats": qn[1:]}]
    summary = utils.summarize(runs, "eval_accuracy", greater=True)
    row = summary["rows"][1]
    assert row["seeds"] == 2 and row["final_mean"] == pytest.approx(0.9)
    assert row["mean_ratio_to_adamw_final"] == pytest.approx(8.0 / 10.0)  # mean 0.86 >= 0.85 at 8 s
    assert summary["rows"][0]["mean_ratio_to_adamw_final"] == pytest.approx(1.0)
    assert "Averaged over 2 seeds, kbfgs reached AdamW's mean final eval_accuracy (0.85) in 0.80x" in summary["verdict"]
    table = utils.summary_table(summary, "eval_accuracy")
    assert "mean final over 2 seeds" in table and "| 0.9000 (0.9000-0.9000) | 0.80 |" in table


def test_summary_counts_a_variant_as_a_quasi_newton_optimizer():
    """A variant row (kbfgs:output_side=kfac) competes in the verdict like its base optimizer: the faster one is
    named, in the single-run and in the seed-averaged sentence."""
    utils = load_script("recipe_utils")

    def run(name, t_reach):
        return {"optimizer": name, "learning_rate": 1e-3, "final": {"eval_accuracy": 0.9},
                "evals": [{"eval_accuracy": 0.5, "seconds": 1.0}, {"eval_accuracy": 0.9, "seconds": t_reach}],
                "train_seconds": 10.0, "median_step_seconds": 0.1}

    adam = run("adamw", 10.0)
    runs = [{**adam, "repeats": [adam]}, {**run("kbfgs", 9.0), "repeats": [run("kbfgs", 9.0)]},
            {**run("kbfgs:output_side=kfac", 6.0), "repeats": [run("kbfgs:output_side=kfac", 6.0)]}]
    verdict = utils.summarize(runs, "eval_accuracy", greater=True)["verdict"]
    assert verdict.startswith("kbfgs:output_side=kfac reached AdamW's final eval_accuracy (0.9) after 6.0 s")
    assert "2 seeds, kbfgs:output_side=kfac reached AdamW's mean final eval_accuracy (0.9) in 0.60x" in verdict


@pytest.mark.parametrize(("muon_finals", "ending"), [
    ([125.0, 126.9, 125.3], "muon ahead by 11.37, outside both seeds' ranges."),
    ([135.0, 139.0, 137.0], "muon ahead by 0.1, within the seeds' ranges."),
    ([150.0, 151.0, 152.0], "kbfgs ahead by 13.9, outside both seeds' ranges."),
])
def test_the_verdict_says_who_ends_ahead_muon_or_the_best_quasi_newton_row(muon_finals, ending):
    """With a Muon row, the verdict compares its mean final with the best quasi-Newton row's (lower perplexity is
    better), naming the leader and whether the seeds' ranges separate them."""
    utils = load_script("recipe_utils")

    def run(name, final):
        return {"optimizer": name, "learning_rate": 1e-3, "final": {"eval_perplexity": final},
                "evals": [{"eval_perplexity": final, "seconds": 5.0}], "train_seconds": 5.0, "median_step_seconds": 0.1}

    def seeds(name, finals):
        return {**run(name, finals[0]), "repeats": [run(name, f) for f in finals[1:]]}

    runs = [seeds("adamw", [320.0, 321.0, 322.0]), seeds("muon", muon_finals),
            seeds("kbfgs", [135.2, 138.7, 137.4]), seeds("mlbfgs", [237.0, 238.0, 239.0])]
    verdict = utils.summarize(runs, "eval_perplexity", greater=False)["verdict"]
    mean = sum(muon_finals) / 3
    assert f"Muon's final eval_perplexity is {mean:.4g} against kbfgs's 137.1 (mean of 3 seeds): {ending}" in verdict


def test_repeats_train_from_their_own_seed(tmp_path):
    """--repeats N trains seeds seed, seed+1, ...: each repeat starts from its own initial weights and data order
    (the Trainer seeds model_init with the run's seed), so the repeats' curves differ; one seed twice is equal."""
    mod = load_script("image_classification")
    base = [a for a in COMMON if a not in ("kbfgs", "mlbfgs")] + ["--model_type", "vit", "--seed", "0"]

    def curves(out_dir, repeats):
        res = mod.main([*base, "--output_dir", out_dir, "--repeats", str(repeats)])
        (run,) = res["runs"]
        return [[e["eval_loss"] for e in r["evals"]] for r in [run, *run["repeats"]]]

    first, second = curves(str(tmp_path / "a"), 2)
    assert first != second
    (again,) = curves(str(tmp_path / "b"), 1)
    assert again == first


def test_a_muon_row_trains_through_the_trainer_and_the_card_says_how(tmp_path):
    """--optimizers adamw muon: Muon on the blocks' matrices and AdamW on the rest, one optimizer through the
    Trainer's factory route at the row's lr (decayed by the Trainer's schedule); the card says which Newton-Schulz
    ran. A model without block matrices (ResNet) is refused, naming muon."""
    mod = load_script("causal_lm")
    out = tmp_path / "muon"
    args = [a for a in COMMON if a not in ("kbfgs", "mlbfgs")]
    res = mod.main([*args, "muon", "--block_size", "16", "--model_type", "llama", "--output_dir", str(out)])
    assert [r["optimizer"] for r in res["runs"]] == ["adamw", "muon"]
    muon = res["runs"][1]
    assert muon["global_step"] == 4 and muon["learning_rate"] == 1e-3 and muon["optimizer_state_bytes"] > 0
    assert muon["newton_schulz"] in ("float32", "bfloat16") and res["runs"][0]["newton_schulz"] is None
    assert res["summary"]["verdict"] == "No quasi-Newton run in this comparison."
    _check_card_and_json(out, "perplexity")
    assert f"Newton-Schulz in {muon['newton_schulz']}) on the blocks' 2-D matrices" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match="Invalid optimizer 'muon' for ResNetForImageClassification"):
        load_script("image_classification").main([*args, "muon", "--model_type", "resnet",
                                                  "--output_dir", str(tmp_path / "resnet")])
