"""``metatl compare SPEC.yaml``: several methods scored on the same fixed test episodes.

A spec (YAML) names the test episodes and the methods::

    name: omniglot_5way                      # the comparison's name (default: the file's stem)
    test:
      data: {name: omniglot, ways: 5, queries: 15}   # a data section; its test subset is scored
      shots: [1, 5, 10]                      # one column per support-set size
      episodes: 600                          # fixed test episodes per shot ...
      seed: 1234                             # ... drawn from this seed (the evaluator's protocol)
      transductive: true                     # eval.transductive of the evaluator
    num_threads: auto                        # intra-op threads while scoring (as train.num_threads)
    methods:
      - label: MAML
        checkpoint: runs/maml/last.pt        # a trained learner (metatl.load) ...
        set: [algorithm.inner_steps_test=10] # ... with overrides of its config
      - label: ProtoNet
        config: configs/protonet_omniglot_5w1s.yaml   # ... or a config, trained first into OUT/<label>
        set: [train.time_budget_min=5]
      - label: Fine-tune all
        checkpoint: runs/baseline/last.pt
        set: [algorithm.adapt_layers=all, algorithm.epochs=20]
        episodes: 100                        # a slow method may score the first N episodes only
      - label: Fine-tune all
        like: ProtoNet                       # ... or an earlier method's learner, with its own overrides

``set`` overrides a checkpoint's config when loading it (``load_learner``), a config before
training, and an earlier method's config for ``like`` (e.g. ``algorithm.adapt_layers=all``: the
same pretrained Baseline fine-tuned per episode, trained once).

Every method is scored by the one evaluator (:func:`metatl.engine.evaluator.evaluate`) on the same
episodes: episode ``i`` of a shot is the same for every method (a method with ``episodes: N`` scores
the first N). Transfer baselines are learners too (``algorithm: baseline`` / ``baseline_pp``, with
``adapt_layers`` and ``l2sp_alpha`` for fine-tuning all layers and L2-SP per episode), so they
enter as checkpoints or configs like the meta-learners.

Output in ``--out``: ``compare.json`` (every number, with provenance), ``compare.md`` (the table),
``accuracy_vs_shots.png`` (accuracy against shots, a line per method, 95% CI bars) and ``card.md``
(table, plot and the exact command, to paste). Columns: accuracy mean +- 95% CI per shot, training
wall time (from the checkpoint), time per test episode (adaptation and prediction, the mean over
the episodes of all shots), parameters of the adapted predictor.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_yaml

SPEC_KEYS = ("name", "test", "methods", "num_threads")
TEST_KEYS = ("data", "shots", "episodes", "seed", "transductive")
METHOD_KEYS = ("label", "checkpoint", "config", "like", "set", "episodes")


@dataclass
class Method:
    label: str
    checkpoint: str | None = None
    config: str | None = None
    like: str | None = None
    overrides: list[str] = field(default_factory=list)
    episodes: int | None = None


@dataclass
class Spec:
    name: str
    data: dict
    shots: list[int]
    methods: list[Method]
    episodes: int = 600
    seed: int = 1234
    transductive: bool = True
    num_threads: int | str | None = "auto"


def _keys(where: str, given: dict, valid) -> None:
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(valid)}.")


def _count(where: str, value, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where} must be a whole number >= {low}, got {value!r}.")
    return value


def parse_spec(raw, name: str = "compare") -> Spec:
    """A :class:`Spec` from the YAML mapping ``raw``, every key checked; errors name the key and the fix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a compare spec is a mapping with keys {', '.join(SPEC_KEYS)}; got {raw!r}.")
    _keys("compare spec", raw, SPEC_KEYS)
    test = raw.get("test")
    if not isinstance(test, dict) or not isinstance(test.get("data"), dict) or "name" not in test["data"]:
        raise ConfigError(
            "compare spec: test.data must be a data section naming the test episodes, e.g. "
            "test: {data: {name: omniglot, ways: 5, queries: 15}, shots: [1, 5]}."
        )
    _keys("compare spec, section test", test, TEST_KEYS)
    shots = test.get("shots", [test["data"].get("shots", 1)])
    if not isinstance(shots, list) or not shots:
        raise ConfigError(f"test.shots must be a list of support-set sizes, e.g. [1, 5, 10]; got {shots!r}.")
    shots = [_count("each of test.shots", k) for k in shots]
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods:
        raise ConfigError(
            "compare spec: methods must be a list, each with a label and a checkpoint or a config, e.g. "
            "methods: [{label: MAML, checkpoint: runs/maml/last.pt}]."
        )
    parsed = []
    for i, m in enumerate(methods):
        if not isinstance(m, dict):
            raise ConfigError(
                f"methods[{i}] must be a mapping (label, checkpoint or config, set, episodes); got {m!r}."
            )
        _keys(f"methods[{i}]", m, METHOD_KEYS)
        label = m.get("label") or Path(str(m.get("checkpoint") or m.get("config") or f"method{i}")).stem
        if sum(key in m for key in ("checkpoint", "config", "like")) != 1:
            raise ConfigError(
                f"methods[{i}] ({label}): give exactly one of checkpoint (a trained learner's .pt), "
                f"config (a YAML config, trained first into the output folder) or like (the label of "
                f"an earlier method whose learner it reuses)."
            )
        if "like" in m and m["like"] not in [p.label for p in parsed]:
            raise ConfigError(
                f"methods[{i}] ({label}): like: {m['like']!r} names no earlier method; earlier labels: "
                f"{', '.join(p.label for p in parsed) or '(none)'}."
            )
        overrides = m.get("set") or []
        if isinstance(overrides, str):
            overrides = [overrides]
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ConfigError(f"methods[{i}] ({label}): set must be a list of key=value overrides; got {overrides!r}.")
        episodes = m.get("episodes")
        if episodes is not None:
            _count(f"methods[{i}].episodes", episodes)
        parsed.append(
            Method(str(label), m.get("checkpoint"), m.get("config"), m.get("like"), list(overrides), episodes)
        )
    labels = [m.label for m in parsed]
    if len({slug(label) for label in labels}) != len(labels):
        raise ConfigError(
            f"compare spec: method labels must differ, also as folder names ({[slug(x) for x in labels]}); got {labels}."
        )
    return Spec(
        name=str(raw.get("name") or name),
        data=dict(test["data"]),
        shots=shots,
        methods=parsed,
        episodes=_count("test.episodes", test.get("episodes", 600)),
        seed=_count("test.seed", test.get("seed", 1234), 0),
        transductive=bool(test.get("transductive", True)),
        num_threads=raw.get("num_threads", "auto"),
    )


def load_spec(path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"compare spec {path} does not exist; see configs/compare/ for examples.")
    return parse_spec(load_yaml(path.read_text(), str(path)), path.stem)


def episode_samplers(spec: Spec) -> dict[int, object]:
    """The test episode source of each shot (``spec.data`` with ``shots`` set), checked: a shot the
    data cannot supply is refused before any training."""
    from .config import from_dict
    from .data import build_sampler

    samplers = {}
    for k in spec.shots:
        data = {**spec.data, "shots": k}
        try:
            samplers[k] = build_sampler(from_dict({"data": data}).data, "test")
        except ValueError as err:
            raise ConfigError(
                f"test.shots: {k}-shot test episodes cannot be drawn from {data['name']}: {err.args[0]}. "
                f"Lower the shots or test.data.queries."
            ) from None
    return samplers


def slug(label: str) -> str:
    """The folder name of a method's run: ``Baseline++`` -> ``Baselinepp``, ``Fine-tune all`` -> ``Fine-tune_all``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.replace("+", "p")).strip("_") or "method"


def _learner(method: Method, out: Path, progress: bool, earlier: dict[str, Method]):
    """The learner of ``method``: loaded from its checkpoint, trained from its config into
    ``out/<label>`` (a finished run there is reused), or an earlier method's with its overrides."""
    from .build import load_learner
    from .config import load_config
    from .engine.run import train

    if method.like is not None:
        base = earlier[method.like]
        if base.checkpoint is not None:
            path, overrides = base.checkpoint, base.overrides + method.overrides
        else:
            path, overrides = out / slug(base.label) / "last.pt", method.overrides
        return load_learner(path, overrides=overrides or None)
    if method.checkpoint is not None:
        if not Path(method.checkpoint).exists():
            raise ConfigError(
                f"method {method.label}: checkpoint {method.checkpoint} does not exist; train it first "
                f"(metatl train CONFIG --out DIR) or give config: instead of checkpoint:."
            )
        return load_learner(method.checkpoint, overrides=method.overrides or None)
    if not Path(method.config).exists():
        raise ConfigError(f"method {method.label}: config {method.config} does not exist; see configs/ for examples.")
    run = out / slug(method.label)
    if not (run / "results.json").exists():
        train(load_config(method.config, method.overrides), run, progress=progress, overwrite=True)
    return load_learner(run / "last.pt")


def check_fits(method: Method, learner, spec: Spec, sampler) -> None:
    """Refuse a learner that cannot take the test episodes, or whose training data holds them."""
    cfg = learner.config
    want = getattr(sampler, "input_spec", {})
    have = getattr(learner, "input_spec", {})
    for key in ("in_channels", "image_size"):
        if key in want and key in have and want[key] != have[key]:
            raise ConfigError(
                f"method {method.label}: its model takes {key}={have[key]} but the test episodes have "
                f"{key}={want[key]}; set test.data.{key}: {have[key]} or use a model trained on such inputs."
            )
    from .registry import ALGORITHMS

    trained_ways = getattr(cfg.data, "ways", None)
    head = getattr(ALGORITHMS.get(cfg.algorithm["name"]), "uses_head", True)
    fixed_head = head and cfg.algorithm["name"] not in ("baseline", "baseline_pp")
    if fixed_head and trained_ways is not None and trained_ways != sampler.ways:
        raise ConfigError(
            f"method {method.label}: a {trained_ways}-way head cannot answer {sampler.ways}-way episodes; "
            f"compare at test.data.ways: {trained_ways} or train it {sampler.ways}-way."
        )
    same = cfg.data.name == spec.data["name"]
    for key in ("split", "domain"):
        if same and key in spec.data and getattr(cfg.data, key, None) not in (None, spec.data[key]):
            raise ConfigError(
                f"method {method.label}: trained with data.{key}={getattr(cfg.data, key)!r} but tested on "
                f"{key} {spec.data[key]!r}: its training classes may be test classes here. Train it with "
                f"data.{key}={spec.data[key]} (set: [data.{key}={spec.data[key]}])."
            )


def parameters(learner, ways: int) -> int:
    """Parameters of the adapted predictor: ``learner.test_parameters(ways)`` where the learner
    discards part of itself at test (Baseline's base classifier), else all its parameters."""
    if hasattr(learner, "test_parameters"):
        return int(learner.test_parameters(ways))
    return sum(p.numel() for p in learner.parameters())


def compare(spec: Spec, out, progress: bool = True, command: str | None = None) -> dict:
    """Score every method of ``spec`` on its fixed test episodes; write the table, plot and card to
    ``out``. Returns the ``compare.json`` record."""
    from .engine.evaluator import evaluate
    from .engine.run import provenance
    from .engine.runtime import Runtime

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samplers = episode_samplers(spec)
    rows = []
    for i, method in enumerate(spec.methods):
        if progress:
            print(f"[{i + 1}/{len(spec.methods)}] {method.label}", flush=True)
        learner = _learner(method, out, progress, {m.label: m for m in spec.methods[:i]})
        check_fits(method, learner, spec, samplers[spec.shots[0]])
        runtime = Runtime(spec.num_threads)  # after training, which sets its own
        episodes = min(method.episodes or spec.episodes, spec.episodes)
        row = {
            "label": method.label,
            "source": method.checkpoint or method.config or f"the learner of {method.like}",
            "overrides": method.overrides,
            "algorithm": learner.config.algorithm["name"],
            "model": learner.config.model["name"],
            "train_seconds": float(learner.trained.get("train_seconds", 0.0)),
            "parameters": parameters(learner, samplers[spec.shots[0]].ways),
            "episodes": episodes,
            "by_shots": {},
        }
        seconds = 0.0
        for k, sampler in samplers.items():
            start = time.perf_counter()
            result = evaluate(
                learner,
                sampler,
                episodes=episodes,
                seed=spec.seed,
                transductive=spec.transductive,
                progress=progress,
                desc=f"{method.label} {k}-shot",
            )
            seconds += time.perf_counter() - start
            runtime.rebalance()
            row["by_shots"][str(k)] = {key: result[key] for key in ("mean", "ci95", "std")}
            if progress:
                print(f"  {k}-shot: {100 * result['mean']:.2f} +- {100 * result['ci95']:.2f}%", flush=True)
        row["seconds_per_episode"] = seconds / (episodes * len(samplers))
        rows.append(row)
    first = samplers[spec.shots[0]]
    record = {
        "name": spec.name,
        "test": {
            "data": spec.data,
            "ways": first.ways,
            "queries": first.queries,
            "shots": spec.shots,
            "episodes": spec.episodes,
            "seed": spec.seed,
            "transductive": spec.transductive,
        },
        "methods": rows,
        "command": command,
        **provenance(),
    }
    (out / "compare.json").write_text(json.dumps(record, indent=1))
    (out / "compare.md").write_text(markdown_table(record) + "\n")
    plot(record, out / "accuracy_vs_shots.png")
    (out / "card.md").write_text(card(record))
    return record


def _seconds(s: float) -> str:
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s" if s >= 1 else f"{1000 * s:.0f} ms"


def markdown_table(record: dict) -> str:
    """The comparison as a Markdown table: accuracy (%) mean +- 95% CI per shot, training time,
    time per test episode, parameters, episodes scored."""
    shots = record["test"]["shots"]
    head = ["method", *(f"{k}-shot" for k in shots), "training", "per episode", "parameters", "episodes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in record["methods"]:
        acc = [
            f"{100 * row['by_shots'][str(k)]['mean']:.2f} ± {100 * row['by_shots'][str(k)]['ci95']:.2f}" for k in shots
        ]
        train = _seconds(row["train_seconds"]) if row["train_seconds"] else "–"
        cells = [row["label"], *acc, train, _seconds(row["seconds_per_episode"]), f"{row['parameters']:,}"]
        lines.append("| " + " | ".join([*cells, str(row["episodes"])]) + " |")
    return "\n".join(lines)


def plot(record: dict, path) -> Path:
    """Accuracy against shots, one line per method, with 95% CI error bars."""
    from .engine.plots import plt

    shots = record["test"]["shots"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in record["methods"]:
        means = [100 * row["by_shots"][str(k)]["mean"] for k in shots]
        cis = [100 * row["by_shots"][str(k)]["ci95"] for k in shots]
        ax.errorbar(shots, means, yerr=cis, marker="o", capsize=3, label=row["label"])
    t = record["test"]
    ax.set(
        xlabel="shots (support examples per class)",
        ylabel="accuracy (%)",
        xticks=shots,
        title=f"{record['name']}: {t['ways']}-way, {t['data']['name']} test episodes",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def card(record: dict) -> str:
    """The results card: what was compared, the table, the plot and the exact command."""
    t = record["test"]
    data = ", ".join(f"{k}={v}" for k, v in t["data"].items())
    lines = [
        f"# {record['name']}",
        "",
        f"{t['ways']}-way test episodes of {t['data']['name']} ({data}), {t['queries']} queries per class, "
        f"{t['episodes']} fixed episodes per shot (seed {t['seed']}, "
        f"{'transductive' if t['transductive'] else 'inductive'} BatchNorm); accuracy (%) mean ± 95% CI.",
        "",
        markdown_table(record),
        "",
        "![accuracy against shots](accuracy_vs_shots.png)",
        "",
        "Methods: "
        + "; ".join(
            f"{r['label']}: {r['algorithm']} on {r['model']}, from {r['source']}"
            + (f" ({', '.join(r['overrides'])})" if r["overrides"] else "")
            for r in record["methods"]
        )
        + ".",
        "",
        f"metatl {record.get('metatl_commit') or '(not a git checkout)'}, Python {record['python_version']}, "
        f"{record['date']}.",
    ]
    if record.get("command"):
        lines += ["", "```bash", record["command"], "```"]
    return "\n".join(lines) + "\n"


__all__ = ["Method", "Spec", "compare", "load_spec", "parse_spec"]
