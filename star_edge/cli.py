"""The `star-edge` command line.

Errors print one line on stderr and exit with status 2 (a traceback only with --debug). Commands
that need training or export code import it inside the command, so `star-edge segment` never
loads them.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from star_edge import __version__
from star_edge.errors import StarEdgeError

app = typer.Typer(
    name="star-edge",
    help="Reasoning segmentation: an MLLM reasons about your query, SAM draws the masks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True, soft_wrap=True)

BundleOption = Annotated[
    Optional[Path], typer.Option("--bundle", help="Bundle folder (default: the bundled demo model).")
]
DebugOption = Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")]


@contextmanager
def _reported_errors(debug: bool) -> Iterator[None]:
    """Turn errors into one line on stderr and exit status 2 (1 for unexpected failures)."""
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except StarEdgeError as exc:
        if debug:
            raise
        errors.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        errors.print(f"[red]internal error:[/red] {type(exc).__name__}: {exc} (rerun with --debug)",
                     markup=True, highlight=False)
        raise typer.Exit(1) from None


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        console.print(f"star-edge {__version__}")
        raise typer.Exit(0)


@app.command()
def segment(
    image: Annotated[Path, typer.Argument(help="Image file (JPEG, PNG, ...).")],
    query: Annotated[str, typer.Argument(help='What to segment, e.g. "what could I cut the rope with?"')],
    samples: Annotated[int, typer.Option("--samples", "-n", help="1 = greedy; >1 = sampling + voting.")] = 8,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for reproducible sampling.")] = None,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the result as JSON here.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write an overlay PNG here.")] = None,
    bundle: BundleOption = None,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnx | tensorrt")] = "torch",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    debug: DebugOption = False,
) -> None:
    """Segment the objects QUERY refers to in IMAGE."""
    with _reported_errors(debug):
        from star_edge.images import load_image, validate_query
        from star_edge.segmenter import Segmenter, check_samples, check_seed

        pixels = load_image(image)  # bad input fails before any model loads
        query = validate_query(query)
        check_samples(samples)
        check_seed(seed)
        segmenter = Segmenter.from_pretrained(bundle, backend=backend, device=device)
        if not segmenter.bundle.trained:
            errors.print(f"note: bundle '{segmenter.bundle.name}' is untrained (weights from config); "
                         "its answers are noise. Pass --bundle DIR for a real model.", highlight=False)
        result = segmenter.segment(pixels, query, samples=samples, seed=seed)
        _print_result(result)
        if json_path is not None:
            _write_file(json_path, lambda p: p.write_text(json.dumps(result.to_json()) + "\n"))
            console.print(f"wrote {json_path}")
        if out is not None:
            _write_file(out, lambda p: result.overlay().save(p, format="PNG"))
            console.print(f"wrote {out}")


@app.command()
def info(bundle: BundleOption = None, debug: DebugOption = False) -> None:
    """Print a bundle's manifest, the backends available here, and versions."""
    with _reported_errors(debug):
        from star_edge.bundle import load_bundle
        from star_edge.defaults import ensure_default_bundle

        loaded = load_bundle(bundle if bundle is not None else ensure_default_bundle())
        table = Table(title=f"bundle {loaded.name}", show_header=False)
        table.add_row("folder", str(loaded.root))
        table.add_row("trained", str(loaded.trained))
        spec = loaded.reasoner
        table.add_row("reasoner", f"{spec.family}, input {spec.input_size[0]}x{spec.input_size[1]}, "
                                  f"frame {spec.frame}, template {spec.prompt_template}, "
                                  f"max_new_tokens {spec.max_new_tokens}")
        table.add_row("sam", f"{loaded.sam.kind} {loaded.sam.variant}, image size {loaded.sam.image_size}")
        size = sum(entry.size for entry in loaded.files.values())
        table.add_row("files", f"{len(loaded.files)} files, {size / 2**20:.1f} MiB, sha256 verified")
        table.add_row("backends in bundle", ", ".join(loaded.backends))
        console.print(table)
        console.print(_runtime_table())


def _runtime_table() -> Table:
    from importlib import metadata

    table = Table(title="runtime", show_header=False)
    table.add_row("star-edge", __version__)
    table.add_row("python", sys.version.split()[0])
    for package in ("numpy", "numba", "torch", "transformers", "onnxruntime", "tensorrt"):
        try:
            table.add_row(package, metadata.version(package))
        except metadata.PackageNotFoundError:
            table.add_row(package, "not installed")
    return table


def _print_result(result) -> None:  # noqa: ANN001 - star_edge.result.Result, imported lazily
    ok = sum(sample.ok for sample in result.samples)
    table = Table(title=f'"{result.query}"')
    for column in ("#", "label", "votes", "score", "box (x1, y1, x2, y2)", "point", "area"):
        table.add_column(column)
    for index, obj in enumerate(result.objects):
        table.add_row(str(index), obj.label, str(obj.votes), f"{obj.score:.3f}", str(obj.box),
                      str(obj.point), str(int(obj.mask.sum())))
    console.print(table)
    console.print(f"samples: {ok}/{len(result.samples)} parsed" + (
        "" if ok == len(result.samples) else
        f"; first failure: {next(s.error for s in result.samples if not s.ok)}"), highlight=False)
    console.print("timings (ms): " + ", ".join(f"{k} {v:.0f}" for k, v in result.timings.items()),
                  highlight=False)


def _write_file(path: Path, write) -> None:  # noqa: ANN001
    from star_edge.errors import InvalidInputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def main() -> None:
    """Entry point of the `star-edge` console script."""
    app()
