"""`micronet report`: every pipeline run in the MLflow store next to the teams' published figures.

Reads the parent run of every pipeline run (tag `micronet.pipeline` names the submission it reproduces) and
writes `pareto.png` (accuracy against score, one panel per task), `summary.md` (one row per run) and a
self-contained `index.html` (the same tables, the picture inlined), then logs the three as artifacts of one run
in the "micronet-report" experiment. The published figures are data: micronet/assets/published/<pipeline>.yaml,
validated when read."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, Sequence

import yaml
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from micronet.errors import MicronetError
from micronet.plots import figure, save
from micronet.scoring import TASKS
from micronet.tracking import (
    MODEL_NAME_TAG, MODEL_VERSION_TAG, PIPELINE_RUN_TAG, PIPELINE_TAG, QUALIFIES_TAG, RELEASED_TAG, SELECT_TAG,
    SELECTED_ON_TEST,
    ensure_experiment, tracking_uri,
)

MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves: the report's links point there

DEMO_PREFIX = "demo-"  # experiments of the toy pipelines: synthetic data, their accuracy means nothing
REPORT_EXPERIMENT = "micronet-report"
PIPELINE_COLOURS = {"wave": "tab:blue", "kaist": "tab:orange", "fastai-wrn": "tab:green", "uci": "tab:red",
                    "dnw": "tab:purple", "kaist-wave": "tab:brown"}
SPARE_COLOURS = ["tab:pink", "tab:olive", "tab:cyan", "tab:gray"]
REPORT_FILES = ("index.html", "pareto.png", "summary.md")


# --- published figures --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PublishedEntry(_Strict):
    """One submitted model, with the numbers as the team published them (their units, their counter)."""

    name: str
    accuracy: float = Field(gt=0, le=1, description="top-1 as a fraction (0.8001, not 80.01)")
    top5: Optional[float] = Field(None, gt=0, le=1)
    params: Optional[float] = Field(None, gt=0, description="parameters as the team counted them")
    ops: Optional[float] = Field(None, gt=0, description="math ops (or MACs) per example as the team counted them")
    ops_unit: Literal["ops", "MACs"] = "ops"
    score: float = Field(gt=0, description="the team's own score")
    leaderboard: Optional[float] = Field(None, gt=0, description="the score on the final leaderboard")
    release: Optional[str] = Field(None, description="file name of the team's released checkpoint of this entry: "
                                   "runs that scored it as imported are its \"re-measured here\" figures")
    notes: str = ""


class PublishedSource(_Strict):
    repository: str
    commit: str = Field(pattern=r"^[0-9a-f]{7,40}$")
    files: list[str] = Field(min_length=1)


class Published(_Strict):
    """A team's published figures: what its pipeline is compared with."""

    pipeline: str
    team: str
    leaderboard_name: str
    task: Literal["cifar100", "imagenet"]
    reproduces: str = Field(description="the entry this project's pipeline reproduces")
    source: PublishedSource
    counting: str = Field(min_length=1, description="how the team counted params and ops")
    entries: list[PublishedEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _entries_named_once(self) -> "Published":
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise ValueError(f"entry names repeat: {names}")
        if self.reproduces not in names:
            raise ValueError(f"reproduces = {self.reproduces!r} names no entry; entries: {', '.join(names)}")
        return self

    @property
    def reproduced(self) -> PublishedEntry:
        return next(e for e in self.entries if e.name == self.reproduces)


def read_published(path: Path | Traversable) -> Published:
    """One published-figures file, validated; the pipeline it names must be its file name."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise MicronetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        published = Published.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"])
            problems.append(f"key '{key}' = {error.get('input')!r}: {error['msg'].removeprefix('Value error, ')}"
                            if error["type"] != "missing" else f"missing key '{key}'")
        raise MicronetError(f"{path}: {'; '.join(problems)}") from None
    stem = path.name.removesuffix(".yaml")
    if published.pipeline != stem:
        raise MicronetError(f"{path}: key 'pipeline' = {published.pipeline!r}: must be the file name {stem!r}")
    return published


@lru_cache(maxsize=1)
def published_figures() -> dict[str, Published]:
    """Every team's published figures, by pipeline name (micronet/assets/published/*.yaml)."""
    folder = resources.files("micronet").joinpath("assets", "published")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return {p.pipeline: p for p in map(read_published, files)}


# --- runs ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PipelineRun:
    """The parent run of one pipeline run: its params and the score stage's final metrics."""

    run_id: str
    experiment: str
    name: str
    pipeline: str
    task: str
    params: dict[str, str]
    metrics: dict[str, float]
    qualifies: Optional[bool]
    commit: str
    experiment_id: str = ""
    model: Optional[tuple[str, str]] = None  # (registered model name, version) the score stage registered
    selected_on_test: bool = False  # a stage kept its best epoch on the test split (select: test)
    released: Optional[str] = None  # the released file this run scored as it was imported (no stage changed it)

    @property
    def demo(self) -> bool:
        return self.experiment.startswith(DEMO_PREFIX)

    @property
    def score(self) -> Optional[float]:
        return self.metrics.get("score")

    @property
    def accuracy(self) -> Optional[float]:
        return self.metrics.get("accuracy")

    @property
    def finished(self) -> bool:
        return self.score is not None and self.accuracy is not None


def _qualifies(tags: dict[str, str]) -> Optional[bool]:
    if tags.get(QUALIFIES_TAG) in ("true", "false"):
        return tags[QUALIFIES_TAG] == "true"
    return None


def _task(params: dict[str, str], pipeline: str) -> str:
    if params.get("score.task") in TASKS:
        return params["score.task"]
    published = published_figures().get(pipeline)
    return published.task if published else "cifar100"


def collect_runs(client: Any, experiments: Optional[Sequence[str]] = None) -> list[PipelineRun]:
    """Parent runs carrying `micronet.pipeline`, from every active experiment or only the named ones."""
    from mlflow.entities import ViewType
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

    found: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, page_token=token)
        found += list(page)
        token = page.token
        if not token:
            break
    by_id = {e.experiment_id: e.name for e in found}
    if experiments:
        missing = sorted(set(experiments) - set(by_id.values()))
        if missing:
            raise MicronetError(f"no experiment {', '.join(map(repr, missing))} in {tracking_uri()}; "
                                f"experiments there: {', '.join(sorted(by_id.values())) or 'none'}")
        by_id = {i: n for i, n in by_id.items() if n in experiments}
    runs: list[PipelineRun] = []
    token = None
    while by_id:
        page = client.search_runs(list(by_id), filter_string=f"tags.`{PIPELINE_TAG}` LIKE '%'",
                                  max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            if MLFLOW_PARENT_RUN_ID in tags or not tags.get(PIPELINE_TAG):
                continue
            params, metrics = dict(run.data.params), dict(run.data.metrics)
            pipeline = tags[PIPELINE_TAG]
            runs.append(PipelineRun(
                run_id=run.info.run_id, experiment=by_id[run.info.experiment_id],
                name=run.info.run_name or tags.get(PIPELINE_RUN_TAG, run.info.run_id), pipeline=pipeline,
                task=_task(params, pipeline), params=params, metrics=metrics,
                qualifies=_qualifies(tags), commit=tags.get(MLFLOW_GIT_COMMIT, ""),
                experiment_id=run.info.experiment_id,
                model=(tags[MODEL_NAME_TAG], tags[MODEL_VERSION_TAG]) if MODEL_VERSION_TAG in tags else None,
                selected_on_test=tags.get(SELECT_TAG) == "test", released=tags.get(RELEASED_TAG),
            ))
        token = page.token
        if not token:
            break
    return sorted(runs, key=lambda r: (r.pipeline, r.experiment, not r.finished, r.score or 0.0, r.name))


def changed_params(runs: Iterable[PipelineRun]) -> dict[str, dict[str, str]]:
    """Per run id, the params whose values differ between the runs of its experiment (a param one run lacks
    differs too). The git commit counts as a param, `commit`, so a code change shows where params did not."""
    groups: dict[str, list[PipelineRun]] = {}
    for run in runs:
        groups.setdefault(run.experiment, []).append(run)
    changed: dict[str, dict[str, str]] = {}
    for members in groups.values():
        values = [{**r.params, **({"commit": r.commit[:7]} if any(m.commit for m in members) else {})}
                  for r in members]
        keys = sorted({k for v in values for k in v})
        differing = [k for k in keys if len({v.get(k) for v in values}) > 1]
        for run, v in zip(members, values):
            changed[run.run_id] = {k: v.get(k, "-") for k in differing}
    return changed


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the (score, accuracy) points no other point beats on both (lower score, higher accuracy),
    by increasing score. Of identical points the first counts."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# --- the picture --------------------------------------------------------------------------------------------


def _colours(pipelines: Iterable[str]) -> dict[str, str]:
    colours = dict(PIPELINE_COLOURS)
    spare = iter(SPARE_COLOURS * 10)
    for name in sorted(set(pipelines)):
        colours.setdefault(name, next(spare))
    return colours


def _gate(task: str) -> float:
    correct, total = TASKS[task]["gate"]
    return correct / total


def _panels(runs: Sequence[PipelineRun]) -> list[tuple[str, bool]]:
    """(task, demo) per panel: one per task of the finished real runs, then one per task of the demo runs, whose
    toy-data accuracies would otherwise squash the real runs against the gate."""
    finished = [r for r in runs if r.finished]
    panels = sorted({(r.task, r.demo) for r in finished}, key=lambda p: (p[1], p[0]))
    return panels or sorted({(r.task, False) for r in runs}) or [("cifar100", False)]


def _spread_labels(fig, labels: list) -> None:
    """Moves each annotation (offset in points) up or down, in steps of its own height, until its box overlaps
    no label placed before it nor a neighbour's point, so names on a crowded front stay readable."""
    if len(labels) < 2:
        return
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # constrained layout places the axes first: boxes are final but for nudges
    placed = []
    for text in labels:
        x0, y0 = text.xyann
        box = text.get_window_extent(renderer)
        step = box.height * 72 / fig.dpi + 1
        for k in [0, 1, -1, 2, -2, 3, -3, 4, -4, 5, -5]:
            text.xyann = (x0, y0 + k * step)
            box = text.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        placed.append(box)


def pareto_figure(runs: Sequence[PipelineRun], published: dict[str, Published]):
    """The Figure draw_pareto saves (see there); its axes' texts are the labels."""
    finished = [r for r in runs if r.finished]
    panels = _panels(runs)
    colours = _colours([r.pipeline for r in runs] + list(published))
    fig = figure(6.4 * len(panels) + 2.2, 5.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    shown: set[str] = set()
    kinds: set[bool] = set()
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    labels_of: dict = {}
    for ax, (task, demo) in zip(axes, panels):
        labels = labels_of.setdefault(ax, [])
        group = [r for r in finished if r.task == task and r.demo == demo]
        for run in group:
            ax.scatter(run.score, run.accuracy, s=36, marker="^" if demo else "o", color=colours[run.pipeline],
                       alpha=0.8 if demo else 0.9, zorder=3)
            shown.add(run.pipeline)
            kinds.add(demo)
        front = sorted((group[i] for i in pareto_front([(r.score, r.accuracy) for r in group])),
                       key=lambda r: r.score)
        if len(front) == 1:  # a step line through one point draws nothing: ring the run that is the front
            ax.scatter(front[0].score, front[0].accuracy, s=170, facecolors="none", zorder=2,
                       edgecolors="0.45" if demo else "black", linewidths=1.2, ls=":" if demo else "-")
        elif front:
            ax.step([r.score for r in front], [r.accuracy for r in front], where="post",
                    color="0.45" if demo else "black", ls=":" if demo else "-", lw=1.2, zorder=2)
        for i, run in enumerate(front):  # alternate below/above: neighbours on a front sit close
            labels.append(ax.annotate(run.name, (run.score, run.accuracy), textcoords="offset points",
                                      xytext=(4, -11 if i % 2 == 0 else 6), fontsize=7, color="0.3"))
        accuracies = [r.accuracy for r in group]
        if not demo:  # toy-data runs are not comparable with the published entries: their panels show neither
            for team in (p for p in published.values() if p.task == task):
                for entry in team.entries:
                    if entry.leaderboard is None:
                        continue
                    ax.scatter(entry.leaderboard, entry.accuracy, s=70, marker="D", facecolors="none",
                               edgecolors=colours[team.pipeline], linewidths=1.6, zorder=4)
                    accuracies.append(entry.accuracy)
                    if entry.name == team.reproduces:
                        labels.append(ax.annotate(team.team, (entry.leaderboard, entry.accuracy),
                                                  textcoords="offset points", xytext=(6, 5), fontsize=8,
                                                  color=colours[team.pipeline]))
                shown.add(team.pipeline)
        gate = _gate(task)
        bounds = accuracies if demo and accuracies else [gate, *accuracies]
        if not demo:
            ax.axhline(gate, color="tab:red", ls="--", lw=1, zorder=1)
        low, high = min(bounds), max(bounds)
        margin = max(0.01, 0.08 * (high - low))
        ax.set_ylim(low - margin, high + margin)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        lo, hi = ax.get_xlim()
        if hi / lo < 10:  # less than a decade shows no major tick: label the minor ones
            ax.xaxis.set_minor_formatter(plain)
        one = " (one run: the front)" if len(group) == 1 else ""
        if demo:
            ax.set_title(f"{task} toy runs (toy data: no accuracy gate, not comparable with published entries)"
                         f"{one}", fontsize=9)
        else:
            ax.set_title(f"{task}: accuracy gate {gate:.0%}{one}", fontsize=11)
        ax.set_xlabel("MicroNet score (log scale, lower is better)")
        ax.set_ylabel("top-1 accuracy (test)" if not demo else "top-1 accuracy (toy test set)")
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], ls="", marker="s", markersize=8, color=colours[p], label=p) for p in sorted(shown)]
    handles += [Line2D([], [], ls="", marker="o", color="0.4", label="run"),
                Line2D([], [], color="black", label="Pareto front")] * (False in kinds or not kinds)
    handles += [Line2D([], [], ls="", marker="^", color="0.4", label="toy run (toy data)"),
                Line2D([], [], color="0.45", ls=":", label="Pareto front (toy runs)")] * (True in kinds)
    handles += [Line2D([], [], ls="", marker="D", markerfacecolor="none", markeredgecolor="0.4",
                       label="published (leaderboard)"),
                Line2D([], [], color="tab:red", ls="--", label="accuracy gate")] * (any(not d for _, d in panels))
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    for labels in labels_of.values():
        _spread_labels(fig, labels)
    return fig


def draw_pareto(runs: Sequence[PipelineRun], published: dict[str, Published], path: Path) -> Path:
    """Accuracy against score (log): the finished runs with their Pareto front, the accuracy gate, and each
    team's published leaderboard entries as hollow diamonds, the reproduced one labelled with the team. One
    panel per task; toy (demo) runs (triangles, dotted front) get panels of their own, without the published
    entries or the gate, which their toy data cannot be compared with. A front of one run is a ring around it;
    labels are moved apart where they would overlap."""
    return save(pareto_figure(runs, published), path)


# --- tables -------------------------------------------------------------------------------------------------


def _count(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _as_published(value: Optional[float]) -> str:
    """A published score with every digit it was published with (shortest repr: 1.251568, 0.0054454)."""
    return "-" if value is None else repr(float(value))


def _published_score(published: Optional[Published]) -> str:
    if published is None:
        return "-"
    entry = published.reproduced
    return f"{_as_published(entry.leaderboard or entry.score)} ({entry.name})"


@dataclass(frozen=True)
class Link:
    """A table cell that links to a page of the MLflow UI."""

    text: str
    url: str

    def __str__(self) -> str:
        return self.text


def run_links(run: PipelineRun, ui: str = MLFLOW_UI) -> tuple[Link, Link | str]:
    """The run's page and its registered model version's page in the MLflow UI ("-" when none was registered)."""
    ui = ui.rstrip("/")
    page = Link(run.run_id[:8], f"{ui}/#/experiments/{run.experiment_id}/runs/{run.run_id}")
    if run.model is None:
        return page, "-"
    name, version = run.model
    return page, Link(f"{name} v{version}", f"{ui}/#/models/{name}/versions/{version}")


def run_rows(runs: Sequence[PipelineRun], published: dict[str, Published], ui: str = MLFLOW_UI,
             ) -> list[dict[str, str | Link]]:
    """One row of cells per run, in report order (the Markdown and HTML tables both show these)."""
    changed = changed_params(runs)
    rows = []
    for run in runs:
        qualifies = "unfinished" if not run.finished else {True: "yes", False: "no", None: "-"}[run.qualifies]
        rows.append({
            "pipeline": run.pipeline + (" (demo)" if run.demo else ""),
            "experiment": run.experiment,
            "run": run.name,
            "changed params": ", ".join(f"{k}={v}" for k, v in changed[run.run_id].items()) or "-",
            "accuracy": ("-" if run.accuracy is None else f"{run.accuracy:.4f}"
                         + (f" ({SELECTED_ON_TEST})" if run.selected_on_test else "")),
            "params": _count(run.metrics.get("params")),
            "flops": _count(run.metrics.get("flops")),
            "score": f"{run.score:.6g}" if run.score is not None else "-",
            "qualifies": qualifies,
            "published score": _published_score(published.get(run.pipeline)),
        })
        rows[-1]["mlflow run"], rows[-1]["registered model"] = run_links(run, ui)
    return rows


def remeasured(entry: PublishedEntry, runs: Sequence[PipelineRun]) -> str:
    """The entry's released file as scored here (accuracy at the project's score, newest finished real run), or -."""
    found = [r for r in runs if entry.release and r.released == entry.release and r.finished and not r.demo]
    if not found:
        return "-"
    run = found[-1]
    return f"{run.accuracy:.4f} at {run.score:.6g} ({run.experiment}/{run.name})"


def published_rows(published: dict[str, Published], runs: Sequence[PipelineRun] = ()) -> list[dict[str, str]]:
    rows = []
    for team in published.values():
        for entry in team.entries:
            ops = _count(entry.ops) + (f" {entry.ops_unit}" if entry.ops is not None and entry.ops_unit != "ops" else "")
            rows.append({
                "pipeline": team.pipeline + (" *" if entry.name == team.reproduces else ""),
                "team": team.team,
                "entry": entry.name,
                "task": team.task,
                "accuracy": _as_published(entry.accuracy),
                "params": _count(entry.params),
                "ops": ops,
                "team's score": _as_published(entry.score),
                "leaderboard": _as_published(entry.leaderboard),
                "re-measured here": remeasured(entry, runs),
                "source": f"{team.source.repository} @ {team.source.commit}: {', '.join(team.source.files)}",
            })
    return rows


def markdown_table(rows: Sequence[dict[str, str | Link]]) -> str:
    if not rows:
        return "(none)\n"
    text = lambda value: str(value).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    cell = lambda value: f"[{text(value)}]({value.url})" if isinstance(value, Link) else text(value)  # noqa: E731
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[k]) for k in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_cell(value: str | Link) -> str:
    if isinstance(value, Link):
        return f"<a href=\"{html.escape(value.url)}\">{html.escape(value.text)}</a>"
    return html.escape(str(value))


def html_table(rows: Sequence[dict[str, str | Link]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    header = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(v)}</td>" for v in row.values()) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _counting_notes(published: dict[str, Published]) -> list[tuple[str, str]]:
    return [(f"{p.team} ({p.pipeline})", p.counting) for p in published.values()]


# --- the report ---------------------------------------------------------------------------------------------

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:13px;margin-bottom:1.5em}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f2f2f2}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #ddd}dt{font-weight:600;margin-top:.5em}dd{margin-left:1.5em;font-size:13px}"""


def write_report(runs: Sequence[PipelineRun], output: Path, published: Optional[dict[str, Published]] = None,
                 ui: str = MLFLOW_UI) -> dict[str, Path]:
    """pareto.png, summary.md and index.html for `runs` in `output` (links to the MLflow UI at `ui`); returns the
    paths by file name."""
    published = published_figures() if published is None else published
    output.mkdir(parents=True, exist_ok=True)
    png = draw_pareto(runs, published, output / "pareto.png")
    rows, figures = run_rows(runs, published, ui), published_rows(published, runs)
    finished = sum(r.finished for r in runs)
    experiments = sorted({r.experiment for r in runs})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"{len(runs)} pipeline runs ({finished} finished, {len(runs) - finished} unfinished) in "
             f"{len(experiments)} experiments: {', '.join(experiments)}. Generated {when}.")
    note_runs = ("Changed params: the params whose values differ between the runs of the same experiment. "
                 "Published score: the leaderboard score of the entry the pipeline reproduces. "
                 f"MLflow run and registered model: their pages in the MLflow UI at {ui} (`make mlflow-ui`). "
                 f"Accuracy \"{SELECTED_ON_TEST}\": a stage kept its best epoch on the test split (select: test, "
                 "the teams' own protocol), so that accuracy is optimistic. "
                 "Unfinished runs (no score of their own: a stage failed or still runs, or DVC skipped the score "
                 "stage because an earlier stage wrote the same output as before) are listed but not plotted.")
    note_published = ("Numbers as each team published them, counted their way (see below); this project re-counts "
                      "every model with one counter, so its scores are not expected to match. "
                      "* = the entry the pipeline reproduces. Re-measured here: the team's released checkpoint "
                      "imported and scored by this project (accuracy on the test split at this project's score).")
    summary = output / "summary.md"
    notes_md = "".join(f"- **{who}**: {text}\n" for who, text in _counting_notes(published))
    summary.write_text(
        f"# micronet report\n\n{intro}\n\n![accuracy vs score](pareto.png)\n\n## Runs\n\n{note_runs}\n\n"
        f"{markdown_table(rows)}\n## Published figures\n\n{note_published}\n\n{markdown_table(figures)}\n"
        f"### How each team counted\n\n{notes_md}",
        encoding="utf-8",
    )
    image = base64.b64encode(png.read_bytes()).decode("ascii")
    notes_html = "".join(f"<dt>{html.escape(who)}</dt><dd>{html.escape(text)}</dd>"
                         for who, text in _counting_notes(published))
    index = output / "index.html"
    index.write_text(
        f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>micronet report</title>"
        f"<style>{STYLE}</style></head><body>\n<h1>micronet report</h1><p>{html.escape(intro)}</p>\n"
        f"<img alt=\"accuracy against MicroNet score\" src=\"data:image/png;base64,{image}\">\n"
        f"<h2>Runs</h2><p>{html.escape(note_runs)}</p>{html_table(rows)}\n"
        f"<h2>Published figures</h2><p>{html.escape(note_published)}</p>{html_table(figures)}\n"
        f"<h3>How each team counted</h3><dl>{notes_html}</dl>\n</body></html>\n",
        encoding="utf-8",
    )
    return {"index.html": index, "pareto.png": png, "summary.md": summary}


def log_report(client: Any, files: dict[str, Path], runs: Sequence[PipelineRun],
               experiments: Optional[Sequence[str]]) -> str:
    """One run in the report experiment holding the three files; returns its id."""
    run = client.create_run(ensure_experiment(client, REPORT_EXPERIMENT),
                            run_name=f"report-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "experiments", ",".join(experiments) if experiments else "all")
        client.log_metric(run_id, "runs", len(runs))
        client.log_metric(run_id, "finished", sum(r.finished for r in runs))
        client.log_metric(run_id, "qualifying", sum(bool(r.qualifies) and r.finished for r in runs))
        for path in files.values():
            client.log_artifact(run_id, str(path))
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return run_id


def make_report(output: Path, experiments: Optional[Sequence[str]] = None, ui: str = MLFLOW_UI,
                ) -> tuple[dict[str, Path], str]:
    """Collect the pipeline runs, write the report into `output` and log it; returns (files, report run id)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    runs = collect_runs(client, experiments)
    if not runs:
        where = f"experiments {', '.join(experiments)}" if experiments else tracking_uri()
        raise MicronetError(f"no pipeline runs (parent runs tagged {PIPELINE_TAG!r}) in {where}; "
                            "run a pipeline first (make demo), or set MLFLOW_TRACKING_URI to its store")
    files = write_report(runs, output, ui=ui)
    return files, log_report(client, files, runs, experiments)
