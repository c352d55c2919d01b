"""Hyperparameter search over a `TrainConfig` with Optuna's TPE sampler (Bergstra et al. 2011,
"Algorithms for Hyper-Parameter Optimization"; Akiba et al. 2019, "Optuna: A Next-generation
Hyperparameter Optimization Framework").

A search space is one line (`parse_search`):

    trials=20,lr=1e-5:1e-2:log,rank=4|8|16,alpha=8:64,adapter_dropout=0:0.2,target_modules=q,v|all-linear

- `trials=N`: how many runs (required);
- `name=LOW:HIGH`: a uniform range (integers when the option is one), `LOW:HIGH:log` log-uniform;
- `name=A|B|C`: a choice;
- `trials=N` alone: the default space, lr log-uniform over [lr / 10, lr * 10] around the config's
  lr, plus rank (4|8|16|32), alpha (8|16|32|64) and adapter_dropout (0:0.2) where the method reads them.

Items are split at a comma followed by `name=`, so a value may hold commas (`target_modules=q,v`).
`search` trains one run per trial into `OUT/trial-N` (N from 0, Optuna's trial number) with the
config's seed in every trial, so trials differ only in what the space sets, and samples with
`TPESampler(seed)`: the same config and space give the same trials. The objective is the run's best
validation loss (lower is better). When `lr` is searched and `min_lr` is not, each trial's
`min_lr` keeps the config's min_lr / lr ratio (the cosine still ends at the same share of the peak).
After every trial `OUT/search.json` and `OUT/search.csv` are rewritten (atomically), so an
interrupted search keeps its finished trials; a trial that diverges is recorded as `diverged`.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from llmkit.errors import TrainingDiverged, UserError
from llmkit.options import rule_of
from llmkit.training.config import TrainConfig
from llmkit.utils import atomic_write_text

# options a search never sets: where the runs go, how they start, and the seed (fixed: trials differ
# only in the hyperparameters searched)
NOT_SEARCHABLE = ("out", "resume", "force", "progress", "seed", "data", "init_from", "model", "task", "objective")
DEFAULT_CHOICES = {"rank": (4, 8, 16, 32), "alpha": (8.0, 16.0, 32.0, 64.0)}
_ITEM_START = re.compile(r",\s*(?=[A-Za-z_][\w-]*\s*=)")  # a comma that starts the next name=value


@dataclass(frozen=True)
class Param:
    """One searched option: a range (`low`..`high`, log-uniform when `log`) or `choices`."""

    name: str
    type: type  # int, float, str or bool: the option's type
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def distribution(self):
        """The Optuna distribution this parameter samples from."""
        import optuna.distributions as d

        if self.choices is not None:
            return d.CategoricalDistribution(self.choices)
        if self.type is int:
            return d.IntDistribution(int(self.low), int(self.high), log=self.log)
        return d.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def describe(self) -> str:
        """The parameter as the spec writes it."""
        if self.choices is not None:
            return f"{self.name}={'|'.join(str(c) for c in self.choices)}"
        return f"{self.name}={self.low:g}:{self.high:g}" + (":log" if self.log else "")


@dataclass(frozen=True)
class SearchSpec:
    """How many trials, and the space they sample (`params`, in the order given)."""

    trials: int
    params: tuple[Param, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return ",".join([f"trials={self.trials}", *(p.describe() for p in self.params)])


# --- the space ---------------------------------------------------------------------------------

def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _word(name: str, rule: Any, word: str) -> Any:
    """A spec word as the option's type, checked by its rule."""
    word = word.strip()
    try:
        if rule.type is bool:
            lowered = word.lower()
            if lowered not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError
            value: Any = lowered in ("true", "yes", "1")
        elif rule.type is int:
            value = int(word)
        elif rule.type is float:
            value = float(word)
        else:
            value = word
    except ValueError:
        raise UserError(f"search: {name} must be {rule.describe()}, got {word!r}") from None
    return rule.check(value, f"search {name}")


def parse_param(name: str, value: str) -> Param:
    """One `name=value` item of a search spec (see the module docstring)."""
    fields = _fields()
    name = name.strip().replace("-", "_")
    if name not in fields:
        raise UserError(f"search: {name!r} is not a training option: search any of lr, rank, alpha, adapter_dropout, "
                        "batch_size, weight_decay, ... (`llmkit train --help` lists them)")
    if name in NOT_SEARCHABLE:
        raise UserError(f"search: {name} cannot be searched (every trial shares it): set it as an option instead")
    rule = rule_of(fields[name])
    if rule is None:
        raise UserError(f"search: {name} is not a single value that can be searched: set it as an option instead")
    if "|" in value:
        choices = tuple(_word(name, rule, w) for w in value.split("|"))
        if len(set(choices)) != len(choices):
            raise UserError(f"search: {name}={value} repeats a choice: give each once")
        return Param(name, rule.type, choices=choices)
    parts = value.split(":")
    if len(parts) in (2, 3) and rule.type in (int, float):
        log = len(parts) == 3
        if log and parts[2].strip() != "log":
            raise UserError(f"search: {name}={value}: a range is LOW:HIGH or LOW:HIGH:log, not {parts[2]!r}")
        low, high = (_word(name, rule, w) for w in parts[:2])
        if not low < high:
            raise UserError(f"search: {name}={value}: LOW must be below HIGH")
        if log and low <= 0:
            raise UserError(f"search: {name}={value}: a log range needs LOW > 0")
        return Param(name, rule.type, low, high, log)
    what = "A|B|C or LOW:HIGH[:log]" if rule.type in (int, float) else "choices A|B|C"
    raise UserError(f"search: {name}={value}: give {what} (a single value is an option, not a search)")


def default_space(cfg: TrainConfig) -> tuple[Param, ...]:
    """lr log-uniform within a factor 10 of the config's, plus the method's rank, alpha and
    adapter_dropout when it reads them."""
    from llmkit.peft import get_method

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    # the method's settings it reads, unless the user set them (then they stay as given)
    reads = [n for n in get_method(cfg.method).options if getattr(cfg, n) == defaults.get(n)]
    params = [Param("lr", float, cfg.lr / 10, min(cfg.lr * 10, 10.0), log=True)]
    for name, choices in DEFAULT_CHOICES.items():
        if name in reads:
            params.append(Param(name, type(choices[0]), choices=choices))
    if "adapter_dropout" in reads:
        params.append(Param("adapter_dropout", float, 0.0, 0.2))
    return tuple(params)


def parse_search(spec: str, cfg: TrainConfig | None = None) -> SearchSpec:
    """A `SearchSpec` from its one-line form (module docstring); `cfg` (needed when the spec has no
    parameters: the default space is centred on its lr and fits its method)."""
    items = [item.strip() for item in _ITEM_START.split(spec.strip()) if item.strip()]
    trials, params = None, []
    for item in items:
        if "=" not in item:
            raise UserError(f"search: {item!r} is not name=value: write e.g. trials=20,lr=1e-5:1e-2:log,rank=4|8|16")
        name, value = (s.strip() for s in item.split("=", 1))
        if name == "trials":
            try:
                trials = int(value)
            except ValueError:
                trials = 0
            if trials < 1:
                raise UserError(f"search: trials must be a whole number >= 1, got {value!r}")
        elif any(p.name == name.replace("-", "_") for p in params):
            raise UserError(f"search: {name} is given twice: give it once")
        else:
            params.append(parse_param(name, value))
    if trials is None:
        raise UserError("search: say how many runs with trials=N, e.g. trials=20,lr=1e-5:1e-2:log")
    if not params:
        if cfg is None:
            raise UserError("search: give parameters to search (e.g. lr=1e-5:1e-2:log) or a config for the default "
                            "space")
        params = list(default_space(cfg))
    return SearchSpec(trials, tuple(params))


# --- trials ------------------------------------------------------------------------------------

def trial_config(cfg: TrainConfig, params: dict[str, Any], out: Path) -> TrainConfig:
    """The config of one trial: `cfg` with `params` set, into `out`; min_lr follows a searched lr
    (module docstring). Checked like any config (UserError naming the option)."""
    values = {**params}
    if "lr" in params and "min_lr" not in params:
        values["min_lr"] = cfg.min_lr * params["lr"] / cfg.lr
    return dataclasses.replace(cfg, out=str(out), **values)


def check_space(cfg: TrainConfig, spec: SearchSpec) -> None:
    """Every range end and every choice gives a valid config, before the first trial runs."""
    for p in spec.params:
        for value in (p.choices if p.choices is not None else (p.low, p.high)):
            value = int(value) if p.type is int else value
            try:
                trial_config(cfg, {p.name: value}, Path(cfg.out) / "trial-check")
            except UserError as e:
                raise UserError(f"search {p.describe()}: {p.name}={value} is not a usable setting here: {e}") from None


def search(cfg: TrainConfig, spec: str | SearchSpec,
           on_trial: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Run the search (module docstring): one `llmkit.training.loop.train` per trial into
    `cfg.out/trial-N`; returns the rows (trial, state, params, val_loss, steps, run_dir, best), and
    writes them to `cfg.out/search.json` and `search.csv` after each trial. `on_trial(row)` is
    called after each trial (a CLI prints it)."""
    import optuna

    from llmkit.training.loop import train

    spec = parse_search(spec, cfg) if isinstance(spec, str) else spec
    check_space(cfg, spec)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=cfg.seed))
    distributions = {p.name: p.distribution() for p in spec.params}
    out = Path(cfg.out)
    rows: list[dict[str, Any]] = []
    for _ in range(spec.trials):
        trial = study.ask(distributions)
        params = {p.name: trial.params[p.name] for p in spec.params}
        run_dir = out / f"trial-{trial.number}"
        row: dict[str, Any] = {"trial": trial.number, "params": params, "run_dir": str(run_dir)}
        try:
            result = train(trial_config(cfg, params, run_dir))
        except TrainingDiverged as e:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            row.update(state="diverged", val_loss=None, steps=None, error=str(e))
        else:
            if result.best_val_loss is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise UserError("search needs a validation loss to compare trials, and this run has no validation "
                                "data: set --val-fraction above 0 (or give the task validation data)")
            study.tell(trial, result.best_val_loss)
            row.update(state="complete", val_loss=result.best_val_loss, steps=result.steps)
        rows.append(row)
        mark_best(rows)
        write_results(rows, spec, out)
        if on_trial is not None:
            on_trial(row)
    return rows


# --- results -----------------------------------------------------------------------------------

def mark_best(rows: list[dict[str, Any]]) -> None:
    """Set `best` on each row: True on the (first) complete row with the lowest val_loss."""
    done = [r for r in rows if r.get("state") == "complete" and r.get("val_loss") is not None
            and math.isfinite(r["val_loss"])]
    best = min(done, key=lambda r: r["val_loss"]) if done else None
    for r in rows:
        r["best"] = r is best


def _param_names(rows: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in rows:
        names += [n for n in r["params"] if n not in names]
    return names


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a text table: trial, each parameter, val loss, steps, state; the best row marked *."""
    names = _param_names(rows)
    head = ["trial", *names, "val loss", "steps", "state", "best"]
    body = [[str(r["trial"]), *(_cell(r["params"].get(n)) for n in names),
             f"{r['val_loss']:.4f}" if r.get("val_loss") is not None else "-", _cell(r.get("steps")),
             r.get("state", ""), "*" if r.get("best") else ""] for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head, *body]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], spec: SearchSpec, out: str | Path) -> None:
    """`out/search.json` (the space, every row and the best trial) and `out/search.csv` (one line a
    trial, one column a parameter), each written atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    best = next((r["trial"] for r in rows if r.get("best")), None)
    atomic_write_text(out / "search.json", json.dumps({"space": spec.describe(), "best_trial": best, "trials": rows},
                                                      indent=2) + "\n")
    names = _param_names(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["trial", *names, "val_loss", "steps", "state", "best", "run_dir"])
    for r in rows:
        writer.writerow([r["trial"], *(r["params"].get(n, "") for n in names),
                         "" if r.get("val_loss") is None else repr(r["val_loss"]), _cell(r.get("steps")),
                         r.get("state", ""), int(bool(r.get("best"))), r["run_dir"]])
    atomic_write_text(out / "search.csv", buf.getvalue())
