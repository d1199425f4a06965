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
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(2)


#: Config kinds that `validate` knows: kind -> (detect key, loader(data, source)).
def _config_kinds():
    from . import defend

    kinds = {"defend": ("method", defend.resolve)}
    try:
        from . import attack

        kinds["attack"] = ("attack", attack.resolve)
    except ImportError:
        pass
    try:
        from . import bench

        kinds["bench"] = ("grid", bench.resolve)
    except ImportError:
        pass
    return kinds


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
            click.secho(f"ok   {path} ({k})", fg="green")
        except (C.ConfigError, ValueError) as exc:
            bad += 1
            click.secho(f"FAIL {exc}", fg="red")
    if bad:
        sys.exit(1)


@main.command("ls")
@click.argument("what", type=click.Choice(["methods", "attacks", "judges", "templates", "all"]), default="all")
def ls_cmd(what: str) -> None:
    """List the available methods, attacks, judges and prompt templates."""
    from .methods import METHODS, get_method
    from .templates import PLAIN_TEMPLATES

    if what in ("methods", "all"):
        click.secho("methods", bold=True)
        for name in sorted(METHODS):
            mod = get_method(name)
            click.echo(f"  {name:<10} {mod.SUMMARY}\n  {'':<10} knows: {mod.KNOWS}")
    if what in ("attacks", "all"):
        try:
            from .attack import ATTACKS, TARGETS
        except ImportError:
            ATTACKS, TARGETS = {}, {}
        click.secho("attacks (trigger presets)", bold=True)
        for name, spec in ATTACKS.items():
            click.echo(f"  {name:<10} {spec.describe()}")
        click.secho("targets", bold=True)
        for name, desc in TARGETS.items():
            click.echo(f"  {name:<10} {desc}")
    if what in ("judges", "all"):
        try:
            from .eval.judges import JUDGES
        except ImportError:
            JUDGES = {}
        click.secho("judges", bold=True)
        for name, judge in JUDGES.items():
            click.echo(f"  {name:<18} {getattr(judge, 'description', '')}")
    if what in ("templates", "all"):
        click.secho("templates", bold=True)
        click.echo("  auto       the tokenizer's chat template, else alpaca")
        click.echo("  chat       the tokenizer's chat template")
        for name, t in PLAIN_TEMPLATES.items():
            click.echo(f"  {name:<10} {t.prompt!r}")


@main.command()
@click.argument("method")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help="Defend config YAML.")
@OVERRIDES
def defend(method: str, config_path: str | None, overrides: tuple[str, ...]) -> None:
    """Remove a backdoor with METHOD (see `unbackdoor ls methods`).

    Example: unbackdoor defend crow -c configs/crow/lab.yaml model.path=runs/bad output.dir=runs/crow
    """
    from . import config as C
    from . import defend as D

    try:
        data = C.load_yaml(config_path) if config_path else {}
        C.apply_overrides(data, list(overrides))
        data.setdefault("method", {})
        if isinstance(data["method"], dict):
            given = data["method"].get("name")
            if given and given != method:
                raise C.ConfigError([("method.name", f"the config says {given!r} but the command says {method!r}")])
            data["method"]["name"] = method
        cfg = D.resolve(data, config_path)
        summary = D.defend(cfg)
    except (C.ConfigError, ValueError, FileExistsError, KeyError) as exc:
        _fail(exc)
        return
    click.secho(f"done: {method} -> {Path(cfg.output.dir) / 'model'}", fg="green")
    for k, v in (summary.get("metrics") or {}).items():
        click.echo(f"  {k}: {v}")


@main.command()
@click.argument("config_type", type=click.Choice(["defend"]), default="defend")
@click.option("--method", default="finetune", help="Method whose fields to list.")
def explain(config_type: str, method: str) -> None:
    """List every config field with its type, default and help."""
    from . import config as C
    from .methods import get_method
    from .schema import DefendConfig

    rows = [r for r in C.explain(DefendConfig) if not r[0].startswith("method")]
    rows += [("method." + k, t, d, h) for k, t, d, h in C.explain(get_method(method).Config)]
    for key, tp, default, help_text in rows:
        click.echo(f"{key:<32} {tp:<24} {default:<14} {help_text}")


if __name__ == "__main__":  # pragma: no cover
    main()
