"""The language-modelling benchmark: its pieces against hand-computed values, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_qn.optim.kbfgs import PRETRAINING_LR, pretraining_lr
from tests._helpers.scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmark_lm")


def test_wikipedia_text_is_real_and_split_by_whole_articles(bench):
    articles = bench.load_wikipedia(max_articles=20)
    assert len(articles) == 20 and articles[0].startswith("Anarchism is a political philosophy")
    assert not any("[[" in a or "'''" in a for a in articles)  # markup and bold quotes stripped
    train, val = bench.split_articles(articles)
    assert val == [articles[9], articles[19]] and len(train) == 18


def test_time_to_reach_and_loss_at_interpolate_between_evaluations(bench):
    rec = {"evals": [{"seconds": 0.0, "val_loss": 8.0}, {"seconds": 10.0, "val_loss": 6.0},
                     {"seconds": 20.0, "val_loss": 5.0}]}
    assert bench.time_to_reach(rec, 7.0) == pytest.approx(5.0)
    assert bench.time_to_reach(rec, 5.5) == pytest.approx(15.0)
    assert bench.time_to_reach(rec, 4.0) == float("inf")
    assert bench.loss_at(rec, 15.0) == pytest.approx(5.5) and bench.loss_at(rec, 30.0) == 5.0


def test_variants_and_bad_names(bench):
    assert bench.split_variant("kbfgs:damping=0.1,tied_heads=False") == ("kbfgs", {"damping": 0.1,
                                                                                    "tied_heads": False})
    assert bench.split_variant("kbfgs_paper_int10") == ("kbfgs_paper_int10", {"preset": "paper",
                                                                                "update_interval": 10})
    assert bench.sweep_grid("kbfgs:graft=none") == bench.SWEEPS["kbfgs_paper"]
    assert bench.sweep_grid("kbfgs_paper", "large") == bench.SWEEPS["kbfgs_paper"]  # the paper's lr: not grafted
    # K-BFGS's grafted grid is centred on the library's default for each size's width: 6e-3 up to 128, 3e-3 at 256
    assert bench.sweep_grid("kbfgs:damping=0.1")[1] == PRETRAINING_LR == pretraining_lr(bench.SIZES["small"][0])
    assert bench.sweep_grid("kbfgs", "large") == [1e-3, 3e-3, 1e-2] and pretraining_lr(bench.SIZES["large"][0]) == 3e-3
    with pytest.raises(ValueError, match="Invalid optimizer 'lion'"):
        bench.split_variant("lion")
    with pytest.raises(ValueError, match="Invalid optimizer 'muon:momentum=0.9': muon takes only adamw_lr, betas, lr="):
        bench.split_variant("muon:momentum=0.9")
    with pytest.raises(ValueError, match="Invalid optimizer 'soap:adamw_lr=0.1': soap takes only lr=VALUE"):
        bench.split_variant("soap:adamw_lr=0.1")
    assert bench.split_variant("muon:lr=0.002") == ("muon", {"lr": 0.002})
    from tests._helpers.models import tiny_gpt2

    model = tiny_gpt2(n_layer=1)
    muon = bench.build_optimizer("muon_fp32:adamw_lr=0.001", model, 0.01)  # its AdamW part at the lr it names
    assert {g["lr"] for g in muon.adamw.param_groups} == {0.001}
    assert {g["lr"] for g in bench.build_optimizer("muon_fp32", model, 0.01).adamw.param_groups} == {0.01}  # the row's
    assert bench.parse_fixed_lrs(["kbfgs:damping=0.1=3e-3"]) == {"kbfgs:damping=0.1": 3e-3}
    # Adam's betas for AdamW's row and Muon's AdamW part, so that a β₂ tried on K-BFGS is given to its peers too
    assert bench.build_optimizer("adamw:betas=(0.9,0.95)", model, 1e-3).param_groups[0]["betas"] == (0.9, 0.95)
    assert bench.build_optimizer("adamw", model, 1e-3).param_groups[0]["betas"] == (0.9, 0.999)
    muon = bench.build_optimizer("muon_fp32:betas=(0.8,0.95)", model, 0.01)
    assert {g["betas"] for g in muon.adamw.param_groups} == {(0.8, 0.95)}
    with pytest.raises(ValueError, match=r"betas must be two numbers in parentheses"):
        bench.split_variant("adamw:betas=0.95")
    with pytest.raises(ValueError, match="soap takes only lr=VALUE"):
        bench.split_variant("soap:betas=(0.9,0.95)")


def test_a_bad_variant_is_refused_before_the_text_is_read(bench, monkeypatch, tmp_path):
    """A variant whose value the optimizer refuses stops the command before any tokenizing or training, with the
    optimizer's own message and the name as given; good names build and pass."""
    def no_data(args):
        raise AssertionError("the data was prepared before the optimizers were checked")

    monkeypatch.setattr(bench, "prepare_data", no_data)
    with pytest.raises(ValueError, match=r"Invalid optimizer 'kbfgs:damping=1.0' in --optimizers: .*damping"):
        bench.main(["--optimizers", "adamw", "kbfgs:damping=1.0", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"Invalid optimizer 'mlbfgs:history_size=0' in --optimizers"):
        bench.check_optimizers(["mlbfgs:history_size=0"])
    bench.check_optimizers(["adamw", "muon", "kbfgs:damping=0.1,tied_heads=False", "mlbfgs"])


def test_a_failing_state_dict_is_reported_as_nan_not_a_crash(bench):
    class Broken:
        def state_dict(self):
            raise RuntimeError("no state here")

    assert math.isnan(bench.state_bytes(Broken(), "broken"))
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert bench.state_bytes(adamw, "adamw") == 0.0  # no step yet: an empty state


def test_a_row_named_with_its_lr_trains_at_that_lr_unswept(bench):
    names = ["adamw", "muon", "muon:lr=0.002", "kbfgs", "kbfgs:lr=4e-3"]
    assert bench.variant_lr("muon:lr=0.002") == 0.002 and bench.variant_lr("muon") is None
    fixed = bench.parse_fixed_lrs(["kbfgs=6e-3"], names)  # the base's lr does not override the row's own
    assert fixed == {"muon:lr=0.002": 0.002, "kbfgs": 6e-3, "kbfgs:lr=4e-3": 4e-3}
    with pytest.raises(ValueError, match=r"Invalid --lr for \['muon:lr=0.002'\]: the name already fixes the lr"):
        bench.parse_fixed_lrs(["muon:lr=0.002=0.003"], names)
    model = bench.gpt2("tiny", 64, 8, 0)
    muon = bench.build_optimizer("muon_fp32:lr=0.002", model, 0.05)
    assert [g["lr"] for g in muon.param_groups] == [0.002] * 3  # Muon's matrices and AdamW's rest at the row's lr
    assert bench.build_optimizer("adamw:lr=5e-3", model, 1e-3).param_groups[0]["lr"] == 5e-3
    assert bench.build_optimizer("kbfgs:lr=4e-3", model, 1e-3).param_groups[0]["lr"] == 4e-3
    assert muon.float32_newton_schulz  # the named row keeps its float32 Newton-Schulz
    assert not bench.build_optimizer("muon:lr=0.002", model, 0.05).float32_newton_schulz


def test_a_variant_takes_its_bases_fixed_lr_unless_given_its_own(bench):
    names = ["adamw", "kbfgs", "kbfgs:grad_decay=0.95", "kbfgs:damping=0.1", "muon"]
    fixed = bench.parse_fixed_lrs(["kbfgs=2e-3", "kbfgs:damping=0.1=5e-3", "adamw=3e-4"], names)
    assert fixed == {"adamw": 3e-4, "kbfgs": 2e-3, "kbfgs:grad_decay=0.95": 2e-3, "kbfgs:damping=0.1": 5e-3}
    assert bench.parse_fixed_lrs(["kbfgs=2e-3"], ["adamw", "kbfgs:grad_decay=0.95"]) == {
        "kbfgs": 2e-3, "kbfgs:grad_decay=0.95": 2e-3}  # a base that only its variants run
    # an ungrafted variant's lr is the paper's α, on another scale: it keeps its own grid
    assert bench.parse_fixed_lrs(["kbfgs=2e-3"], ["adamw", "kbfgs", "kbfgs:graft=none"]) == {"kbfgs": 2e-3}
    with pytest.raises(ValueError, match=r"Invalid --lr for \['kbfgs:grad_decay=0.9'\]"):
        bench.parse_fixed_lrs(["kbfgs:grad_decay=0.9=2e-3"], names)  # a typo is refused, not ignored
    with pytest.raises(ValueError, match=r"Invalid --lr for \['soap'\]"):
        bench.parse_fixed_lrs(["soap=1e-2"], names)


def test_decaying_schedules_take_each_runs_lr_to_zero_over_its_own_budget(bench):
    cosine, linear = bench.LR_SCHEDULES["cosine"], bench.LR_SCHEDULES["linear"]
    assert [cosine(f) for f in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [linear(f) for f in (0.0, 0.25, 1.0, 1.5)] == pytest.approx([1.0, 0.75, 0.0, 0.0])
    run = object.__new__(bench.Run)  # only the lr setting, on a run's own clock
    group = {"lr": 0.0}
    run._groups, run._warmup, run._schedule, run.budget = [(group, 2e-3)], 20, cosine, 60.0
    for steps, clock, lr in ((9, 0.0, 1e-3), (30, 30.0, 1e-3), (30, 60.0, 0.0)):  # warm-up half way; then cosine
        run.steps, run.clock = steps, clock
        run._set_lr()
        assert group["lr"] == pytest.approx(lr, abs=1e-12)
    with pytest.raises(ValueError, match="Invalid --lr_schedule 'step'"):
        bench.main(["--lr_schedule", "step", "--output_dir", "/nonexistent"])
    # mL-BFGS's unit-norm direction takes an lr that is a step length: its own grid, not mlbfgs='s
    assert bench.sweep_grid("mlbfgs:normalize=unit,update_interval=10") == bench.SWEEPS["mlbfgs_unit"]
    assert bench.parse_fixed_lrs(["mlbfgs=3e-4"], ["adamw", "mlbfgs", "mlbfgs:normalize=unit"]) == {"mlbfgs": 3e-4}


def test_sweep_extends_a_grid_whose_best_lr_is_at_an_end(bench, monkeypatch):
    """A grid won at its top end grows by 3x until the optimum is interior (the loss is least at 0.05)."""
    monkeypatch.setitem(bench.SWEEPS, "adamw", [0.001, 0.01])

    class FakeRun:
        def __init__(self, name, lr, seed, budget, data, args):
            self.name, self.lr, self.clock, self.steps = name, lr, budget, 1

        def record(self):
            return {"final_val_loss": (torch.log10(torch.tensor(self.lr)) - torch.log10(torch.tensor(0.05))).abs()
                    .item()}

    monkeypatch.setattr(bench, "Run", FakeRun)
    monkeypatch.setattr(bench, "interleave", lambda runs, slice_seconds, label: None)
    args = bench.LMBenchmarkArguments(seeds=[0])
    out = bench._sweep_group(["adamw"], {}, args)["adamw"]
    assert out["lr"] == pytest.approx(0.03) and out["interior"]
    assert sorted(float(k) for k in out["grid"]) == pytest.approx([0.001, 0.01, 0.03, 0.09])
    assert [sorted(r) for r in out["rounds"]] == [["0.001", "0.01"], ["0.01", "0.03"], ["0.03", "0.09"]]


def test_a_sweep_extension_is_decided_under_one_machine_load(bench, monkeypatch):
    """Each round finds the machine slower (every loss 10 higher than the round before): the end a round extends
    is re-run beside the new candidate, so the lr kept is still the true optimum, 0.03, not the first round's
    0.01 (compared across rounds, 0.03's slower run would lose to it)."""
    monkeypatch.setitem(bench.SWEEPS, "adamw", [0.001, 0.01])
    load = [0.0]

    class SlowerEachRound:
        def __init__(self, name, lr, seed, budget, data, args):
            self.name, self.lr, self.clock, self.steps = name, lr, budget, 1

        def record(self):
            return {"final_val_loss": abs(math.log10(self.lr / 0.05)) + load[0]}

    def interleave(runs, slice_seconds, label):
        load[0] += 10.0

    monkeypatch.setattr(bench, "Run", SlowerEachRound)
    monkeypatch.setattr(bench, "interleave", interleave)
    out = bench._sweep_group(["adamw"], {}, bench.LMBenchmarkArguments(seeds=[0]))["adamw"]
    assert out["lr"] == pytest.approx(0.03) and out["interior"]
    assert out["rounds"][1] == {"0.01": pytest.approx(20.0 + math.log10(5)),
                                "0.03": pytest.approx(20.0 + math.log10(0.05 / 0.03))}
    # the card shows each round (the one that kept 0.03 over 0.01), not the latest loss per lr: 0.03's is round 3's
    shown = bench.sweep_rounds({"adamw": out})["adamw"]
    assert shown[1] == {"0.01": round(20.0 + math.log10(5), 3), "0.03": round(20.0 + math.log10(0.05 / 0.03), 3)}
    assert out["grid"]["0.03"] == pytest.approx(30.0 + math.log10(0.05 / 0.03)) and len(shown) == 3


def test_tiny_end_to_end_run_writes_table_plot_and_card(bench, tmp_path):
    names = ["adamw", "kbfgs", "mlbfgs"]
    result = bench.main(["--size", "tiny", "--max_articles", "12", "--optimizers", *names, "--budget", "1.5",
                         "--sweep_seconds", "0", "--eval_every", "0.5", "--slice_seconds", "0.5", "--seeds", "0", "1",
                         "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["optimizer"], r["seed"]) for r in saved["records"]] == [(n, s) for s in (0, 1) for n in names]
    for r in saved["records"]:
        assert r["error"] is None and r["seconds"] >= 1.5 and r["steps"] > 0
        assert r["evals"][0]["seconds"] == 0.0 and len(r["evals"]) >= 2  # at the start, then every 0.5 s
    first = {r["optimizer"]: r["evals"][0]["val_loss"] for r in saved["records"] if r["seed"] == 0}
    assert len(set(first.values())) == 1  # the same initial weights for every optimizer of a seed
    adam = result["rows"][0]
    assert adam["optimizer"] == "adamw" and adam["median_ratio"] == [1.0, 1.0]
    assert all(0 < x <= 1.0 for x in adam["reach"])  # AdamW reaches its own final loss by its end
    for f in ("results.md", "loss_curves.png", "README.md"):
        assert (tmp_path / f).stat().st_size > 0
    table = (tmp_path / "results.md").read_text()
    # without a sweep a row runs at its grid's middle, which for K-BFGS is the library's pretraining default
    assert f"| kbfgs | {PRETRAINING_LR:g} |" in table
    # the row records K-BFGS's output factor as "auto" resolved it: a GPT-2 built from a config takes K-FAC's
    assert [r["output_side"] for r in saved["records"][:3]] == [None, "kfac", None]
    assert "output factor: kfac |" in table.split("| kbfgs |")[1].splitlines()[0]


def test_device_and_autocast_are_resolved_or_refused_naming_the_option(bench):
    def resolve(**kw):
        return bench.resolve_device(bench.LMBenchmarkArguments(**kw))

    cuda = torch.cuda.is_available()
    auto_device, auto_dtype = resolve()
    assert auto_device.type == ("cuda" if cuda else "cpu")
    assert auto_dtype is (torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None)
    assert resolve(device="cpu") == (torch.device("cpu"), None)  # no autocast on a CPU unless asked
    assert resolve(device="cpu", autocast="bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="Invalid --autocast 'fp8'"):
        resolve(autocast="fp8")
    with pytest.raises(ValueError, match="Invalid --device 'tpu'"):
        resolve(device="tpu")
    with pytest.raises(ValueError, match="Invalid --device 'meta'"):
        resolve(device="meta")
    if not cuda:
        with pytest.raises(ValueError, match="--device cuda: no CUDA device is available here; use --device cpu"):
            resolve(device="cuda")


def test_a_run_under_bf16_autocast_records_state_bytes_per_parameter(bench, tmp_path):
    """Under bf16 autocast every optimizer trains (finite losses, float32 weights kept) and the table gives each
    optimizer's state size: AdamW's two float32 moments are 8 bytes a parameter (plus one step counter per tensor),
    K-BFGS's factors and momentum more; no peak-memory column off a GPU."""
    result = bench.main(["--size", "tiny", "--max_articles", "12", "--optimizers", "adamw", "kbfgs", "--budget", "1",
                         "--sweep_seconds", "0", "--eval_every", "0.5", "--slice_seconds", "0.5", "--device", "cpu",
                         "--autocast", "bfloat16", "--output_dir", str(tmp_path)])
    assert result["meta"]["args"]["autocast"] == "bfloat16"
    for r in result["records"]:
        assert r["error"] is None and r["steps"] > 0 and all(math.isfinite(e["val_loss"]) for e in r["evals"])
    per_param = {row["optimizer"]: row["state_bytes_per_param"] for row in result["rows"]}
    n_tensors = len(list(bench.gpt2("tiny", 4096, 128, 0).parameters()))
    n_params = result["records"][0]["params"]
    assert per_param["adamw"] == pytest.approx(8.0 + 4.0 * n_tensors / n_params)  # float32 exp_avg, exp_avg_sq, step
    assert per_param["kbfgs"] > per_param["adamw"]
    table = (tmp_path / "results.md").read_text()
    assert "state bytes / param" in table and "peak GiB" not in table


def test_text_files_are_read_as_blank_line_separated_documents(bench, tmp_path):
    """Articles written one after another with blank lines between come back as the same documents, from a plain
    or a compressed file; a missing file and too little text are refused, naming the option."""
    import gzip

    articles = bench.load_wikipedia(max_articles=12)
    plain, packed = tmp_path / "corpus.txt", tmp_path / "more.txt.gz"
    plain.write_text("\n\n  \n".join(articles[:7]) + "\n", encoding="utf-8")
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n\n".join(articles[7:]))
    assert bench.load_text_files([str(plain), str(packed)]) == articles
    assert bench.load_text_files([str(plain)], max_documents=3) == articles[:3]
    with pytest.raises(FileNotFoundError, match="--text_files: no file"):
        bench.load_text_files([str(tmp_path / "missing.txt")])
    args = bench.LMBenchmarkArguments(text_files=[str(plain)], vocab_size=300, block_size=32)
    assert bench.corpus_name(args) == "text of corpus.txt"
    with pytest.raises(ValueError, match="at least 10 are needed"):
        bench.prepare_data(args)  # 7 documents: none would be held out
    args.text_files = [str(plain), str(packed)]
    data = bench.prepare_data(args)
    assert data["documents"] == 12 and data["train"].shape[1] == 32 and len(data["val"]) > 0
    assert int(data["train"].max()) < 300


def test_a_run_on_text_files_names_them_in_its_card(bench, tmp_path):
    articles = bench.load_wikipedia(max_articles=12)
    (tmp_path / "notes.txt").write_text("\n\n".join(articles), encoding="utf-8")
    out = tmp_path / "out"
    bench.main(["--size", "tiny", "--text_files", str(tmp_path / "notes.txt"), "--optimizers", "adamw", "kbfgs",
                "--budget", "0.5", "--sweep_seconds", "0", "--eval_every", "0.25", "--slice_seconds", "0.25",
                "--output_dir", str(out)])
    card = (out / "README.md").read_text()
    assert "causal language modelling on text of notes.txt" in card and "12 documents" in card
    saved = json.loads((out / "results.json").read_text())
    assert saved["meta"]["args"]["text_files"] == [str(tmp_path / "notes.txt")]
    assert saved["meta"]["code"].startswith("hf_qn ")  # which hf_qn ran (model_card.code_description)
    assert all(r["error"] is None and r["steps"] > 0 for r in saved["records"])


def test_the_default_hub_repository_names_the_corpus_and_the_size(bench):
    def args(**kw):
        return bench.LMBenchmarkArguments(output_dir="out", **kw)

    assert bench.default_hub_model_id(args()) == "hf-qn/lm-gpt2-wikipedia-benchmark"
    assert bench.default_hub_model_id(args(size="large")) == "hf-qn/lm-gpt2-wikipedia-large-benchmark"
    assert (bench.default_hub_model_id(args(text_files=["/data/Library Docstrings.txt.gz", "b.txt"]))
            == "hf-qn/lm-gpt2-library-docstrings-benchmark")
    assert bench.default_hub_model_id(args(text_files=["/data/.txt"])) == "hf-qn/lm-gpt2-text-benchmark"


def test_muons_share_is_every_block_matrix_of_either_family(bench):
    """Muon takes the 2-D weights inside the blocks (GPT-2's fused Conv1D, Llama's seven projections); the
    embeddings and Llama's untied head go to AdamW with the norms and biases."""
    from muon_with_adamw import hidden_matrices  # scripts/ is on sys.path once the benchmark is loaded

    gpt, llama = bench.gpt2("tiny", 64, 8, 0), bench.llama("tiny", 64, 8, 0)
    assert hidden_matrices(gpt) == [f"transformer.h.0.{m}.weight"
                                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert hidden_matrices(llama) == [f"model.layers.0.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")]
    both = bench.build_optimizer("muon", llama, 1e-2)
    muon, adamw = both.muon, both.adamw
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    named = dict(llama.named_parameters())
    assert in_muon == {id(named[n]) for n in hidden_matrices(llama)}
    assert named["lm_head.weight"] is not named["model.embed_tokens.weight"]  # untied
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == {id(p) for p in llama.parameters()} - in_muon
    # the SwiGLU width is 8/3 of the model's, rounded up to a multiple of 32: GPT-2's MLP parameters, about
    assert llama.config.intermediate_size == 96 and bench.llama("small", 64, 8, 0).config.intermediate_size == 352


def test_a_llama_run_trains_every_optimizer_and_names_the_family(bench, tmp_path):
    with pytest.raises(ValueError, match="--arch 'bert'"):
        bench.main(["--arch", "bert", "--output_dir", str(tmp_path)])
    names = ["adamw", "muon_fp32", "kbfgs"]
    bench.main(["--arch", "llama", "--size", "tiny", "--max_articles", "12", "--optimizers", *names, "--budget", "1",
                "--sweep_seconds", "0", "--eval_every", "0.5", "--slice_seconds", "0.5", "--output_dir", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in saved["records"]] == names
    assert all(r["error"] is None and r["steps"] > 0 and math.isfinite(r["final_val_loss"]) for r in saved["records"])
    assert saved["records"][2]["output_side"] == "kfac"  # a Llama built from a config trains from scratch
    card = (tmp_path / "README.md").read_text()
    assert "Llama tiny" in card
    hub_id = bench.default_hub_model_id(bench.LMBenchmarkArguments(arch="llama", size="tiny"))
    assert hub_id == "hf-qn/lm-llama-wikipedia-tiny-benchmark"
