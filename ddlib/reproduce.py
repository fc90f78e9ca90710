"""The papermill batch driver behind ``make reproduce`` and ``make notebooks``.

    python -m ddlib.reproduce --scale quick|paper [--only 01,02] [--device auto]
                              [--write-back] [--log-output]

Notebooks are ``notebooks/NN_name.ipynb``. At **quick** scale each one runs once with its own
defaults (the ``parameters`` cell *is* quick mode). At **paper** scale each parameter file
``configs/NN/<tag>.yaml`` is one run, tagged by the file stem; a notebook without paper configs
is skipped with a note. Parameters are injected only where they differ from the notebook's
defaults: ``device`` (when ``--device`` is not ``auto``), ``scale`` and ``tag`` (when the
notebook declares them), then the YAML's values.

Before anything runs, every YAML key is checked against the notebook's parameters (papermill
reads the ``parameters`` cell without starting a kernel); a misspelt key stops the batch with
the closest valid name. Executed copies go to ``<results>/<scale>/NN_name[__tag].ipynb``,
stripped of volatile metadata (:mod:`ddlib.nbtools`). A failing notebook does not stop the
batch: the run ends with a table and a non-zero exit status naming what failed.

Notebooks execute with ``notebooks/`` as the working directory (as in Jupyter), in a kernel
that runs *this* interpreter (checked, see :func:`resolve_kernel`).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import yaml

from ddlib import nbtools
from ddlib.results import SCALES, repo_root, results_root

NOTEBOOK_PATTERN = re.compile(r"^(\d\d)_[A-Za-z0-9_\-]+\.ipynb$")
RESERVED_KEYS = ("scale",)  # a YAML may set these even if the notebook does not declare them


class ReproduceError(Exception):
    """A problem found before running anything (bad scale, --only, config or kernel)."""


@dataclass(frozen=True)
class Notebook:
    number: str  # "01"
    name: str  # "01_linear_lower_bound"
    path: Path


@dataclass(frozen=True)
class Job:
    notebook: Notebook
    scale: str
    tag: str | None
    parameters: dict
    output: Path
    config: Path | None = None


@dataclass
class Outcome:
    job: Job
    ok: bool
    seconds: float
    error: str = ""
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- discovery

def discover_notebooks(notebooks_dir: Path) -> list[Notebook]:
    """All ``NN_name.ipynb`` files in ``notebooks_dir``, sorted by number then name."""
    if not notebooks_dir.is_dir():
        return []
    found = []
    for path in sorted(notebooks_dir.iterdir()):
        m = NOTEBOOK_PATTERN.match(path.name)
        if m and path.is_file():
            found.append(Notebook(number=m.group(1), name=path.stem, path=path))
    return found


def find_notebook(notebooks_dir: Path, number: str) -> Notebook:
    """The notebook numbered ``number`` (e.g. ``"05"``) in ``notebooks_dir``; FileNotFoundError if none."""
    found = [nb for nb in discover_notebooks(notebooks_dir) if nb.number == number]
    if not found:
        raise FileNotFoundError(f"no notebook {notebooks_dir}/{number}_*.ipynb")
    return found[0]


def parse_only(only: str | None) -> list[str]:
    """``"01,2 03"`` -> ``["01", "02", "03"]``; full stems (``01_linear``) are kept as given."""
    tokens = [t for t in re.split(r"[,\s]+", only or "") if t]
    return [t.zfill(2) if t.isdigit() else t for t in tokens]


def select_notebooks(notebooks: list[Notebook], only: str | None) -> list[Notebook]:
    """The notebooks named by ``--only`` (all when empty); an unknown name is an error."""
    wanted = parse_only(only)
    if not wanted:
        return list(notebooks)
    available = ", ".join(nb.name for nb in notebooks) or "none"
    chosen = []
    for token in wanted:
        matches = [nb for nb in notebooks if token in (nb.number, nb.name)]
        if not matches:
            raise ReproduceError(f"--only {token}: no such notebook; available: {available}")
        chosen.extend(m for m in matches if m not in chosen)
    return sorted(chosen, key=lambda nb: nb.name)


def check_scale(scale: str) -> str:
    if scale not in SCALES:
        raise ReproduceError(f"--scale {scale}: unknown scale; use one of: {', '.join(SCALES)}")
    return scale


# ----------------------------------------------------------------------------- parameters

def notebook_parameters(path: Path) -> dict[str, str]:
    """Parameter name -> default (as source text) from the notebook's ``parameters`` cell."""
    from papermill import inspect_notebook

    return {name: info["default"] for name, info in inspect_notebook(str(path)).items()}


def load_config(path: Path) -> dict:
    """A YAML parameter file as a dict (an empty file is ``{}``)."""
    with path.open() as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReproduceError(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def config_files(configs_dir: Path, notebook: Notebook) -> list[Path]:
    """The paper-scale parameter files of ``notebook``: ``configs/NN/*.yaml`` (and ``*.yml``)."""
    folder = configs_dir / notebook.number
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())


def check_config(config: dict, path: Path, notebook: Notebook, declared: dict[str, str]) -> None:
    """Raise :class:`ReproduceError` for any key of ``config`` that ``notebook`` does not declare."""
    problems = []
    for key in config:
        if key in declared or key in RESERVED_KEYS:
            continue
        close = difflib.get_close_matches(str(key), list(declared), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"unknown parameter {key!r}{hint}")
    if problems:
        valid = ", ".join(declared) or "none (the notebook has no parameters cell)"
        raise ReproduceError(
            f"{path}: " + "; ".join(problems) + f" for notebook {notebook.name}. Valid parameters: {valid}"
        )
    if "scale" in config and config["scale"] != "paper":
        raise ReproduceError(f"{path}: scale={config['scale']!r}, but files under configs/ are paper-scale runs")


def check_all_configs(notebooks: list[Notebook], configs_dir: Path) -> int:
    """Validate every config file of ``notebooks`` without running anything; return how many."""
    count = 0
    for nb in notebooks:
        files = config_files(configs_dir, nb)
        if files:
            declared = notebook_parameters(nb.path)
            for path in files:
                check_config(load_config(path), path, nb, declared)
                count += 1
    return count


def _equals_default(value, default: str | None) -> bool:
    if default is None:
        return False
    try:
        return ast.literal_eval(default) == value
    except (ValueError, SyntaxError):
        return False


def injected(wanted: dict, declared: dict[str, str]) -> dict:
    """Keep the entries of ``wanted`` the notebook declares and whose value is not its default."""
    return {k: v for k, v in wanted.items() if k in declared and not _equals_default(v, declared[k])}


# ----------------------------------------------------------------------------- planning

def output_path(results_dir: Path, scale: str, notebook: Notebook, tag: str | None) -> Path:
    name = notebook.name if not tag else f"{notebook.name}__{tag}"
    return results_dir / scale / f"{name}.ipynb"


def _names_config(config: str, path: Path) -> bool:
    """Whether ``--config`` names this file: its stem (``paper_fixed_init``), its file name, or its path."""
    if config in (path.stem, path.name):
        return True
    given = Path(config)
    return given.suffix in (".yaml", ".yml") and given.exists() and given.resolve() == path.resolve()


def plan(notebooks: list[Notebook], scale: str, configs_dir: Path, results_dir: Path,
         device: str = "auto", config: str | None = None) -> tuple[list[Job], list[str]]:
    """Build (and validate) every run of the batch; return ``(jobs, notes)``. Runs nothing.

    ``config`` (a file stem such as ``paper_fixed_init``, or that file's name or path) restricts a
    paper-scale batch to that file.
    """
    check_scale(scale)
    jobs: list[Job] = []
    notes: list[str] = []
    for nb in notebooks:
        declared = notebook_parameters(nb.path)
        base: dict = {}
        if device and device != "auto":
            if "device" in declared:
                base["device"] = device
            else:
                notes.append(f"{nb.name}: no `device` parameter; --device {device} not passed")
        if scale == "quick":
            jobs.append(Job(nb, scale, None, injected({**base, "scale": scale}, declared),
                            output_path(results_dir, scale, nb, None)))
            continue
        files = config_files(configs_dir, nb)
        if config:
            files = [f for f in files if _names_config(config, f)]
        if not files:
            notes.append(f"{nb.name}: no {scale}-scale configs in {configs_dir / nb.number}/, skipped")
            continue
        for path in files:
            values = load_config(path)
            check_config(values, path, nb, declared)
            tag = path.stem
            wanted = {"tag": tag, **values, **base, "scale": scale}
            jobs.append(Job(nb, scale, tag, injected(wanted, declared),
                            output_path(results_dir, scale, nb, tag), config=path))
    return jobs, notes


# ----------------------------------------------------------------------------- execution

def _runs_this_interpreter(argv0: str) -> bool:
    # jupyter_client replaces a bare "python", "python3" or "python3.11" with sys.executable.
    major, minor = sys.version_info[:2]
    if argv0 in {"python", f"python{major}", f"python{major}.{minor}"}:
        return True
    try:
        return Path(argv0).resolve() == Path(sys.executable).resolve() or os.path.samefile(argv0, sys.executable)
    except OSError:
        return False


def resolve_kernel() -> str:
    """A kernel name whose kernel runs this interpreter: ``ddlab`` if registered, else ``python3``.

    ``python3`` is ipykernel's own spec, shipped inside the environment; its ``argv[0]`` is a
    bare ``python``, which jupyter_client resolves to ``sys.executable``. A ``python3`` spec
    elsewhere (e.g. ``~/.local/share/jupyter``) can shadow it, hence the check.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    for name in (nbtools.KERNEL_NAME, "python3"):
        try:
            spec = manager.get_kernel_spec(name)
        except NoSuchKernel:
            continue
        if spec.argv and _runs_this_interpreter(spec.argv[0]):
            return name
    raise ReproduceError(
        f"no Jupyter kernel runs {sys.executable}; register one with `make kernel` "
        "(python -m ipykernel install --sys-prefix --name ddlab)"
    )


def run_job(job: Job, kernel_name: str, cwd: Path, log_output: bool = False,
            progress_bar: bool = False) -> Outcome:
    """Execute one job with papermill; never raises for a notebook error."""
    import papermill as pm

    job.output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    error = ""
    try:
        pm.execute_notebook(
            str(job.notebook.path), str(job.output), parameters=job.parameters or None,
            kernel_name=kernel_name, cwd=str(cwd), log_output=log_output, progress_bar=progress_bar,
        )
    except pm.PapermillExecutionError as exc:
        error = f"{exc.ename}: {exc.evalue} (cell {exc.exec_count})"
    except Exception as exc:  # kernel died, bad notebook, ...: report it, keep the batch going
        error = f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if job.output.exists():
        nbtools.clean_file(job.output)
    return Outcome(job=job, ok=not error, seconds=seconds, error=error)


def write_back(job: Job) -> Path:
    """Copy the stripped executed notebook over its source (defaults only, no injected cell), stamped with
    the machine its outputs were made on (:func:`ddlib.nbtools.stamp`)."""
    if job.parameters:
        raise ReproduceError(f"{job.notebook.name}: not written back, parameters were injected: {job.parameters}")
    nb = nbformat.read(job.output, as_version=4)
    nbtools.stamp(nbtools.strip_injected_parameters(nbtools.strip_volatile(nb)))
    tmp = job.notebook.path.with_suffix(".ipynb.tmp")
    nbformat.write(nb, tmp)
    shutil.move(tmp, job.notebook.path)
    return job.notebook.path


def run_batch(jobs: list[Job], cwd: Path, kernel_name: str, write_back_ok: bool = False,
              log_output: bool = False, progress_bar: bool = False, echo=print) -> list[Outcome]:
    """Run every job in order; a failure is recorded and the batch goes on."""
    outcomes = []
    for i, job in enumerate(jobs, 1):
        label = job.notebook.name + (f" [{job.tag}]" if job.tag else "")
        params = f" with {job.parameters}" if job.parameters else ""
        echo(f"[{i}/{len(jobs)}] {label} ({job.scale}){params} -> {_pretty(job.output)}")
        outcome = run_job(job, kernel_name, cwd, log_output=log_output, progress_bar=progress_bar)
        if outcome.ok and write_back_ok:
            if job.parameters:
                outcome.notes.append(f"not written back: parameters were injected ({job.parameters})")
            else:
                outcome.notes.append(f"wrote back {_pretty(write_back(job))}")
        status = "ok" if outcome.ok else f"FAILED: {outcome.error}"
        echo(f"    {status} ({outcome.seconds:.1f} s)" + "".join(f"; {n}" for n in outcome.notes))
        outcomes.append(outcome)
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    """A plain-text summary table: notebook, tag, status, seconds."""
    rows = [("notebook", "tag", "status", "seconds")]
    rows += [(o.job.notebook.name, o.job.tag or "-", "ok" if o.ok else "FAILED", f"{o.seconds:.1f}") for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _pretty(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------- command line

def reproduce(scale: str = "quick", only: str | None = None, device: str = "auto", *, config: str | None = None,
              notebooks_dir: Path, configs_dir: Path, results_dir: Path, write_back_ok: bool = False,
              log_output: bool = False, progress_bar: bool = False, echo=print) -> int:
    """Plan, validate and run a batch; return the exit status (0 when every run succeeded).

    Raises :class:`ReproduceError` for problems found before anything runs.
    """
    check_scale(scale)
    if write_back_ok and (scale != "quick" or (device and device != "auto")):
        raise ReproduceError("--write-back needs --scale quick and --device auto: only default runs are committed")
    if config and scale == "quick":
        raise ReproduceError(f"--config {config} selects a paper-scale file; quick mode runs the notebook defaults")
    notebooks = select_notebooks(discover_notebooks(notebooks_dir), only)
    if not notebooks:
        echo(f"no notebooks matching NN_name.ipynb in {notebooks_dir}; nothing to run")
        return 0
    jobs, notes = plan(notebooks, scale, configs_dir, results_dir, device, config)
    if config and not jobs:
        available = sorted({f.stem for nb in notebooks for f in config_files(configs_dir, nb)})
        raise ReproduceError(f"no config named {config!r} for the selected notebooks; available: {available}")
    for note in notes:
        echo(f"note: {note}")
    if not jobs:
        echo("nothing to run")
        return 0
    kernel = resolve_kernel()
    echo(f"{len(jobs)} run(s) at scale={scale}, kernel {kernel!r} ({sys.executable}), cwd {_pretty(notebooks_dir)}")
    outcomes = run_batch(jobs, notebooks_dir, kernel, write_back_ok, log_output, progress_bar, echo)
    echo("")
    echo(format_table(outcomes))
    failed = [o for o in outcomes if not o.ok]
    if failed:
        echo(f"\n{len(failed)} of {len(outcomes)} run(s) failed; tracebacks are in the executed copies:")
        for o in failed:
            echo(f"  {o.job.notebook.name}{' [' + o.job.tag + ']' if o.job.tag else ''}: {o.error}\n"
                 f"    see {_pretty(o.job.output)}")
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    root = repo_root()
    p = argparse.ArgumentParser(prog="python -m ddlib.reproduce", description="Run the ddlab notebooks with papermill.")
    p.add_argument("--scale", default="quick", help=f"one of {', '.join(SCALES)} (default quick)")
    p.add_argument("--only", default="", help="notebook numbers, e.g. 01 or 01,02 (default: all)")
    p.add_argument("--device", default="auto", help="passed as the `device` parameter unless auto")
    p.add_argument("--config", default="",
                   help="paper scale: run only configs/NN/<CONFIG>.yaml (its stem, file name or path)")
    p.add_argument("--write-back", action="store_true",
                   help="copy each stripped executed notebook over notebooks/ (quick scale, defaults only)")
    p.add_argument("--log-output", action="store_true", help="stream cell outputs to the terminal")
    p.add_argument("--notebooks", type=Path, default=root / "notebooks", help="notebooks folder (default: the repo's)")
    p.add_argument("--configs", type=Path, default=root / "configs", help="configs folder (default: the repo's)")
    p.add_argument("--results", type=Path, default=None, help="results root (default: $DDLIB_RESULTS or results/)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.log_output:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return reproduce(
            args.scale, args.only, args.device, config=args.config or None,
            notebooks_dir=args.notebooks, configs_dir=args.configs,
            results_dir=args.results or results_root(), write_back_ok=args.write_back,
            log_output=args.log_output, progress_bar=sys.stderr.isatty() and not args.log_output,
        )
    except ReproduceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
