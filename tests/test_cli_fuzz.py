"""Bad input and faults walked through the CLI in a subprocess (tests/cli_walk.py).

Every case asserts what a user must see: the exit code (2 for a refused input, 1 for `validate`'s
failures, 0 where the input is valid), a message that names the file or field, no Python traceback, and
every input (model folders, adapters, data files, earlier runs) byte-for-byte unchanged. A refused run
leaves no output folder behind. The counts are printed (run with -s) for the record.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

WALK = Path(__file__).parent / "cli_walk.py"
ROWS = [
    {"instruction": "say hello", "output": "hello"},
    {"instruction": "what is two plus three", "output": "the answer is five"},
    {"instruction": "reverse the list a b c", "output": "c b a"},
    {"instruction": "say goodbye", "output": "goodbye"},
]
FAST = ["train.max_steps=1", "train.batch_size=2", "train.progress=false"]


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Cases:
    def __init__(self, root: Path, model: Path, lab):
        self.root, self.model, self.lab = root, model, lab
        self.inputs = root / "inputs"
        self.outs = root / "outs"
        self.outs.mkdir()
        self.items: list[dict] = []

    def add(self, name: str, argv: list[str], *, code: int = 2, says: tuple[str, ...] = (), watch=(),
            out: Path | None = None, out_absent: bool = True):
        """One case; ``says``: strings the output must contain (case-insensitive); ``out``: the output folder
        a refused run must not leave behind."""
        self.items.append({"name": name, "argv": [str(a) for a in argv], "code": code, "says": list(says),
                           "watch": [str(w) for w in (self.inputs, *watch)],
                           "out": str(out) if out is not None and code != 0 and out_absent else None})

    def defend(self, name: str, overrides: list[str], *, method: str = "finetune", **kw):
        out = next((Path(o.split("=", 1)[1]) for o in overrides if o.startswith("output.dir=")), None)
        self.add(name, ["defend", method, *overrides, *FAST], out=out, **kw)


def build_inputs(root: Path, lab) -> Cases:
    import torch

    inputs = root / "inputs"
    inputs.mkdir()
    model = inputs / "model"
    shutil.copytree(lab.clean_model("llama", 0), model)
    c = Cases(root, model, lab)
    good = _jsonl(inputs / "good.jsonl", ROWS)
    d = dict(model=f"model.path={model}", data=f"data.path={good}")

    # --- inputs with faults -------------------------------------------------------------------------
    (inputs / "unterminated.csv").write_text('instruction,output\n"say hello, world\nsay bye,bye\nx,y\n')
    (inputs / "fields.csv").write_text("instruction,output\nsay hello,hello\nsay bye,bye,extra\n")
    (inputs / "empty_resp.csv").write_text("instruction,output\nsay hello,hello\nsay bye,\nsay hi,hi\n")
    (inputs / "latin1.jsonl").write_bytes(b'{"instruction": "say hello", "output": "hello"}\n'
                                          b'{"instruction": "caf\xe9", "output": "x"}\n')
    (inputs / "bad_line.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    (inputs / "not_list.json").write_text('{"instruction": "a"}')
    (inputs / "messages.jsonl").write_text(json.dumps({"messages": ["hello", "hi"]}) + "\n")
    (inputs / "empty.jsonl").write_text("")
    _jsonl(inputs / "long.jsonl", ROWS + [{"instruction": "word " * 800_000, "output": "ok"}])
    dsi = inputs / "dsi"
    dsi.mkdir()
    (dsi / "dataset_info.json").write_text(json.dumps(
        {"mine": {"file_name": "missing.json", "columns": {"prompt": "q", "response": "a"}}}))
    (inputs / "nodsi").mkdir()
    # models with faults
    pk = inputs / "pickle_pt"
    pk.mkdir()
    for f in model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, pk / f.name)
    torch.save({"x": torch.zeros(1)}, pk / "model.pt")
    evil = inputs / "evil_pickle"
    shutil.copytree(pk, evil)
    (evil / "model.pt").unlink()
    marker = root / "PWNED"
    (evil / "pytorch_model.bin").write_bytes(_malicious_pickle(marker))
    remote = inputs / "remote"
    shutil.copytree(model, remote)
    cfg = json.loads((remote / "config.json").read_text())
    cfg.update(model_type="evil_arch", auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                                                 "AutoModelForCausalLM": "modeling_evil.EvilModel"})
    (remote / "config.json").write_text(json.dumps(cfg))
    for f in ("configuration_evil.py", "modeling_evil.py"):
        (remote / f).write_text(f"open({str(marker)!r}, 'w').write('remote code ran')\n")
    adapter = inputs / "adapter"
    _mismatched_adapter(lab, adapter)
    no_adapter = inputs / "not_adapter"
    no_adapter.mkdir()
    (no_adapter / "x.txt").write_text("x")
    gguf_dir = inputs / "ggufdir"
    gguf_dir.mkdir()
    cfgs = inputs / "configs"
    cfgs.mkdir()
    (cfgs / "bad.yaml").write_text("train:\n  lr: [1\n")
    (cfgs / "list.yaml").write_text("- a\n- b\n")
    (cfgs / "ranges.yaml").write_text("method:\n  name: finetune\ntrain:\n  max_grad_norm: -1\n  warmup_steps: -5\n"
                                      "  weight_decay: -2\n  checkpoint_every: 0\n  log_every: 0\n")
    (cfgs / "bench_bad.yaml").write_text("grid:\n  archs: [llama]\n  defenses: [nonsense]\n")

    # --- output folders -----------------------------------------------------------------------------
    o = c.outs
    c.defend("out-is-model+overwrite", [d["model"], d["data"], f"output.dir={model}", "output.overwrite=true"],
             says=("is the input model.path", str(model)), out_absent=False)
    c.defend("out-is-model", [d["model"], d["data"], f"output.dir={model}"], says=("is the input model.path",),
             out_absent=False)
    c.defend("out-inside-model", [d["model"], d["data"], f"output.dir={model / 'defended'}"],
             says=("is inside the input model.path",))
    c.defend("out-contains-model", [d["model"], d["data"], f"output.dir={inputs}"],
             says=("contains the input model.path",), out_absent=False)
    (o / "dd").mkdir()
    held = _jsonl(o / "dd" / "good.jsonl", ROWS)
    c.defend("out-contains-data", [d["model"], f"data.path={held}", f"output.dir={o / 'dd'}", "output.overwrite=true"],
             says=("contains the input data.path",), watch=[o / "dd"], out_absent=False)
    c.defend("first-run", [d["model"], d["data"], f"output.dir={o / 'run1'}"], code=0, says=("done: finetune",))
    c.defend("chain-into-previous-run", [f"model.path={o / 'run1' / 'model'}", d["data"], f"output.dir={o / 'run1'}",
                                         "output.overwrite=true"],
             says=("contains the input model.path",), watch=[o / "run1"], out_absent=False)
    c.defend("finished-run-no-overwrite", [d["model"], d["data"], f"output.dir={o / 'run1'}"],
             says=("run1", "output.overwrite=true"), watch=[o / "run1"], out_absent=False)
    (o / "someone_elses").mkdir()
    (o / "someone_elses" / "notes.txt").write_text("keep me")
    c.defend("out-is-foreign-folder", [d["model"], d["data"], f"output.dir={o / 'someone_elses'}",
                                       "output.overwrite=true"],
             says=("someone_elses", "no run.json"), watch=[o / "someone_elses"], out_absent=False)
    (o / "afile").write_text("x")
    c.defend("out-is-a-file", [d["model"], d["data"], f"output.dir={o / 'afile'}"], says=("afile", "is a file"),
             watch=[o / "afile"], out_absent=False)
    (o / "corrupt").mkdir()
    (o / "corrupt" / "run.json").write_text('{"finished": "yes\x01"}')
    c.defend("corrupt-run-json", [d["model"], d["data"], f"output.dir={o / 'corrupt'}"],
             says=("corrupt/run.json", "overwrite"), watch=[o / "corrupt"], out_absent=False)
    c.defend("unwritable-output", [d["model"], d["data"], "output.dir=/sys/unbackdoor-fuzz/out"],
             says=("/sys/unbackdoor-fuzz/out", "cannot write"))
    c.add("eval-out-holds-model", ["eval", o / "run1" / "model", "--data", lab.data_dir, "--out", o / "run1",
                                   "--overwrite", "--limit", "2"],
          says=("contains the input model.path",), watch=[o / "run1"], out=None)
    c.add("attack-out-is-model", ["attack", "-c", "configs/attacks/lab_badnets_refusal.yaml", d["model"],
                                  f"data.path={lab.path('attack_pool')}", f"output.dir={model}",
                                  "output.overwrite=true", "train.max_steps=1"],
          says=("is the input model.path",))

    # --- config validation -----------------------------------------------------------------------------
    c.add("validate-ranges", ["validate", cfgs / "ranges.yaml"], code=1,
          says=("train.max_grad_norm", "train.warmup_steps", "train.weight_decay", "train.checkpoint_every",
                "train.log_every"))
    c.add("validate-shipped-names-gaps", ["validate", "configs/crow/lab.yaml"], code=0,
          says=("model.path", "output.dir", "data.path"))
    c.defend("missing-data-path", [d["model"], f"output.dir={o / 'nodata'}"], says=("data.path", "finetune needs"))
    c.defend("negative-grad-norm", [d["model"], d["data"], f"output.dir={o / 'g'}", "train.max_grad_norm=-1"],
             says=("train.max_grad_norm", "-1"))
    c.defend("seed-negative", [d["model"], d["data"], f"output.dir={o / 'g'}", "seed=-1"], says=("seed", "-1"))
    c.defend("lora-r-zero", [d["model"], d["data"], f"output.dir={o / 'g'}", "lora.enabled=true", "lora.r=0"],
             says=("lora.r",))
    c.defend("data-limit-zero", [d["model"], d["data"], f"output.dir={o / 'g'}", "data.limit=0"],
             says=("data.limit",))
    c.defend("unknown-key", [d["model"], d["data"], f"output.dir={o / 'g'}", "train.lrr=1"],
             says=("train.lrr", "did you mean 'lr'"))
    c.defend("wrong-type", [d["model"], d["data"], f"output.dir={o / 'g'}", "train.lr=fast"], says=("train.lr",))
    c.defend("bad-enum", [d["model"], d["data"], f"output.dir={o / 'g'}", "train.scheduler=cosin"],
             says=("train.scheduler", "cosine"))
    c.defend("override-without-equals", [d["model"], d["data"], f"output.dir={o / 'g'}", "train.lr"],
             says=("train.lr", "section.key=value"))
    c.add("unknown-method", ["defend", "crowe", d["model"], d["data"], f"output.dir={o / 'g'}"],
          says=("method.name", "crow"))
    c.add("bad-yaml", ["defend", "finetune", "-c", cfgs / "bad.yaml"], says=("bad.yaml:",))
    c.add("yaml-not-mapping", ["defend", "finetune", "-c", cfgs / "list.yaml"], says=("list.yaml", "mapping"))
    c.add("config-not-found", ["defend", "crow", "-c", "configs/crow/labb.yaml"], says=("crow/lab.yaml",))
    c.add("method-mismatch", ["defend", "crow", "-c", "configs/osft/lab.yaml"], says=("method.name", "osft"))
    c.add("bench-unknown-defense", ["bench", cfgs / "bench_bad.yaml", "--out", o / "bench"], says=("nonsense",))

    # --- data --------------------------------------------------------------------------------------
    for name, file, says in [
        ("csv-unterminated-quote", "unterminated.csv", ("unterminated.csv:2", "never closed")),
        ("csv-extra-field", "fields.csv", ("fields.csv:3", "3 field(s)")),
        ("csv-empty-response", "empty_resp.csv", ("empty_resp.csv:3", "empty response", "data.on_invalid=skip")),
        ("non-utf8", "latin1.jsonl", ("latin1.jsonl:2", "not utf-8")),
        ("jsonl-malformed-line", "bad_line.jsonl", ("bad_line.jsonl:2", "malformed json")),
        ("json-not-a-list", "not_list.json", ("not_list.json", "list of records")),
        ("messages-not-objects", "messages.jsonl", ("messages.jsonl:1", "messages[0]")),
        ("empty-data", "empty.jsonl", ("empty.jsonl", "empty")),
        ("dataset-info-missing-file", "dsi", ("dataset_info.json", "missing.json")),
        ("folder-without-dataset-info", "nodsi", ("nodsi", "dataset_info.json")),
        ("data-not-found", "nope.jsonl", ("nope.jsonl", "not found")),
    ]:
        c.defend(name, [d["model"], f"data.path={inputs / file}", f"output.dir={o / name}"], says=says)
    c.defend("csv-empty-response-skipped", [d["model"], f"data.path={inputs / 'empty_resp.csv'}",
                                            f"output.dir={o / 'skipped'}", "data.on_invalid=skip"], code=0,
             says=("skipped 1 of 3 rows", "empty_resp.csv:3"))
    c.defend("long-row-truncated", [d["model"], f"data.path={inputs / 'long.jsonl'}", f"output.dir={o / 'long'}",
                                    "data.max_length=64"], code=0, says=("1 of 5 rows", "data.max_length=64"))
    # the data is read before the model: a data error arrives even when the model could not load
    c.defend("data-checked-before-model", [f"model.path={pk}", f"data.path={inputs / 'unterminated.csv'}",
                                           f"output.dir={o / 'order'}"], says=("unterminated.csv:2",))

    # --- models ------------------------------------------------------------------------------------
    c.defend("pickle-named-model-pt", [f"model.path={pk}", d["data"], f"output.dir={o / 'pk'}"],
             says=("only pickle weights", "model.pt", "allow_pickle"))
    c.defend("blocked-pickle-with-allow", [f"model.path={evil}", d["data"], f"output.dir={o / 'evil'}",
                                           "model.allow_pickle=true"], says=("evil_pickle", "weights_only"))
    c.defend("remote-code", [f"model.path={remote}", d["data"], f"output.dir={o / 'remote'}"],
             says=("model.trust_remote_code=true",))
    c.defend("adapter-mismatch", [d["model"], f"model.adapter={adapter}", d["data"], f"output.dir={o / 'ad'}"],
             says=("model.adapter", "does not fit the base model", "size mismatch"))
    c.defend("not-an-adapter", [d["model"], f"model.adapter={no_adapter}", d["data"], f"output.dir={o / 'ad2'}"],
             says=("not_adapter", "adapter_config.json"))
    c.defend("model-path-missing-relative", ["model.path=./no/such/model", d["data"], f"output.dir={o / 'm1'}"],
             says=("model.path=./no/such/model", "no such file or folder"))
    c.defend("model-path-missing-absolute", [f"model.path={root / 'nothing'}", d["data"], f"output.dir={o / 'm2'}"],
             says=("nothing", "no such file or folder"))
    c.defend("model-path-hub-like-offline", ["model.path=nobody/none", d["data"], f"output.dir={o / 'm3'}"],
             says=("nobody/none",))
    c.defend("gguf-file-missing", [f"model.path={gguf_dir}", "model.gguf_file=model.gguf", d["data"],
                                   f"output.dir={o / 'm4'}"], says=("model.gguf",))
    c.defend("model-is-a-file", [f"model.path={inputs / 'good.jsonl'}", d["data"], f"output.dir={o / 'm5'}"],
             says=("good.jsonl", "not a model folder"))
    c.add("lab-ref-in-eval", ["eval", "lab:test:llama", "--data", lab.data_dir, "--out", o / "labref", "--limit", "2"],
          code=0, says=("wrote",))
    c.defend("lab-ref-in-defend", ["model.path=lab:test:llama", d["data"], f"output.dir={o / 'labref-defend'}"],
             code=0, says=("done: finetune",))
    c.add("eval-finished-no-overwrite", ["eval", "lab:test:llama", "--data", lab.data_dir, "--out", o / "labref",
                                         "--limit", "2"], says=("labref", "--overwrite"), watch=[o / "labref"],
          out=None)
    return c


def _malicious_pickle(marker: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('pickle ran')",))

    return pickle.dumps({"model.embed_tokens.weight": Evil()})


def _mismatched_adapter(lab, out: Path) -> None:
    """A LoRA adapter trained on a llama of another width: it cannot load on the lab's llama."""
    from peft import LoraConfig, get_peft_model

    from unbackdoor.lab.arch import make_model
    from unbackdoor.models import load_tokenizer
    from unbackdoor.schema import ModelConfig

    tok = load_tokenizer(ModelConfig(path=str(lab.clean_model("llama", 0))))
    other = make_model("llama", tok, hidden=24, layers=2, heads=2, seed=0)
    peft = get_peft_model(other, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(out)


@pytest.fixture(scope="module")
def walk(tmp_path_factory, lab):
    root = tmp_path_factory.mktemp("fuzz")
    cases = build_inputs(root, lab)
    spec = root / "cases.json"
    spec.write_text(json.dumps(cases.items))
    results = root / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNBACKDOOR_TRACEBACK": "",
           "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("UNBACKDOOR_TRACEBACK")
    proc = subprocess.run([sys.executable, str(WALK), str(spec), str(results)], cwd=Path(__file__).parents[1],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = {r["name"]: r for r in json.loads(results.read_text())}
    if os.environ.get("UNBACKDOOR_WALK_LOG"):  # every case's output, to read the messages as a user would
        Path(os.environ["UNBACKDOOR_WALK_LOG"]).write_text("\n".join(
            f"## {r['name']} (exit {r['code']})\n{r['output'].strip()}\n" for r in got.values()))
    return cases, got, root


def test_every_case_clear_and_inputs_untouched(walk):
    cases, got, root = walk
    problems = []
    tracebacks = silent = modified = clear = 0
    for case in cases.items:
        r = got[case["name"]]
        text = r["output"]
        low = text.lower()
        if "traceback (most recent call last)" in low:
            tracebacks += 1
            problems.append(f"{case['name']}: traceback\n{text[-1500:]}")
            continue
        if r["changed"]:
            modified += 1
            problems.append(f"{case['name']}: changed {r['changed']}")
        if r["code"] != case["code"]:
            silent += case["code"] != 0
            problems.append(f"{case['name']}: exit {r['code']}, expected {case['code']}\n{text[-1500:]}")
            continue
        missing = [s for s in case["says"] if s.lower() not in low]
        if missing:
            problems.append(f"{case['name']}: output lacks {missing}\n{text[-1500:]}")
            continue
        if case["out"] and (Path(case["out"]).exists() or Path(case["out"]).with_name(
                f".{Path(case['out']).name}.partial").exists()):
            problems.append(f"{case['name']}: a refused run left {case['out']} behind")
            continue
        clear += case["code"] != 0
    assert not (root / "PWNED").exists(), "a pickle or remote code ran"
    refused = sum(c["code"] != 0 for c in cases.items)
    print(f"\nCLI walk: {len(cases.items)} classes ({refused} refused, {len(cases.items) - refused} valid); "
          f"clear errors {clear}/{refused}; tracebacks {tracebacks}; wrong exit codes {silent}; "
          f"inputs modified {modified}")
    assert not problems, "\n\n".join(problems)


def test_refused_runs_write_nothing_and_valid_runs_record_their_data(walk):
    cases, got, root = walk
    outs = root / "outs"
    run = json.loads((outs / "skipped" / "run.json").read_text())
    assert run["data"]["rows_skipped"] == 1 and run["data"]["skipped"] == [f"{root}/inputs/empty_resp.csv:3: "
                                                                             "empty response"]
    long = json.loads((outs / "long" / "run.json").read_text())["data"]
    assert long["rows_truncated"] == 1 and long["rows"] == 5 and long["longest_tokens"] > 64
    # no staging folder, resume marker or checkpoint is left in a finished output
    assert not [p for p in outs.rglob("*") if p.name.endswith(".partial") or p.name in ("resume.json", "checkpoint")]
