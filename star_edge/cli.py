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
from rich.markup import escape
from rich.table import Table

from star_edge import __version__
from star_edge.errors import StarEdgeError

try:
    from typer._click.exceptions import ClickException  # Typer carries its own click from 0.2x on
except ImportError:
    from click import ClickException

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
BackendOption = Annotated[str, typer.Option(
    "--backend", help="auto (ONNX on a CPU where the bundle has it, else torch) | torch | onnx | tensorrt")]


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
        errors.print(f"[red]error:[/red] {escape(str(exc))}", markup=True, highlight=False)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: still one line unless --debug
        if debug:
            raise
        errors.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))} "
                     "(rerun with --debug)",
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
    backend: BackendOption = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    adaptive: Annotated[bool, typer.Option(
        "--adaptive", help="Vote on answers as they finish; stop once the rest cannot change the vote.")] = False,
    margin: Annotated[Optional[int], typer.Option(
        "--margin", help="With --adaptive: also stop once this many more samples could not change it.")] = None,
    debug: DebugOption = False,
) -> None:
    """Segment the objects QUERY refers to in IMAGE."""
    with _reported_errors(debug):
        from star_edge.images import load_image, validate_query
        from star_edge.segmenter import Segmenter, check_margin, check_samples, check_seed

        pixels = load_image(image)  # bad input fails before any model loads
        query = validate_query(query)
        check_samples(samples)
        check_seed(seed)
        check_margin(margin, adaptive)
        _check_output(json_path, "--json", image)
        _check_output(out, "--out", image, suffix=".png")
        segmenter = Segmenter.from_pretrained(bundle, backend=backend, device=device)
        if not segmenter.bundle.trained:
            errors.print(f"note: bundle '{segmenter.bundle.name}' is untrained (weights from config); "
                         "its answers are noise. Pass --bundle DIR for a real model.", highlight=False)
        result = segmenter.segment(pixels, query, samples=samples, seed=seed, adaptive=adaptive, margin=margin)
        _print_result(result)
        if adaptive and samples > 1:
            console.print(f"adaptive: drew {len(result.samples)} of {samples} samples", highlight=False)
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
        from star_edge.defaults import default_bundle_path

        loaded = load_bundle(bundle if bundle is not None else default_bundle_path())
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


@app.command("eval")
def evaluate(
    data: Annotated[Optional[Path], typer.Argument(
        help="A ReasonSeg folder (JSON beside each image) or a Hugging Face save_to_disk folder.")] = None,
    synthetic: Annotated[bool, typer.Option(
        "--synthetic", help="Evaluate on the synthetic test split, generated on the fly.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic benchmark.")] = 0,
    count: Annotated[int, typer.Option("--count", help="Synthetic samples to generate.")] = 500,
    split: Annotated[Optional[str], typer.Option(
        "--split", help="Split of a DatasetDict folder, or of the synthetic data (default test).")] = None,
    samples: Annotated[str, typer.Option(
        "--samples", "-n", help="N per query: 1 = greedy; several, comma-separated, e.g. 1,8.")] = "1",
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate the first K images only.")] = None,
    all_queries: Annotated[bool, typer.Option(
        "--all-queries", help="Score every query of an image; by default its first only, as LISA scores "
                              "ReasonSeg (published numbers count each image once).")] = False,
    bundle: BundleOption = None,
    backend: BackendOption = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
    plots: Annotated[Optional[Path], typer.Option(
        "--plots", help="Write PNG plots and worst-case overlays into this folder.")] = None,
    worst: Annotated[int, typer.Option("--worst", help="Worst cases to draw with --plots.")] = 8,
    debug: DebugOption = False,
) -> None:
    """Score a bundle on reasoning-segmentation data: gIoU and cIoU overall, per type and depth."""
    with _reported_errors(debug):
        from rich.progress import Progress

        from star_edge.errors import InvalidInputError
        from star_edge.segmenter import Segmenter, check_samples
        from star_edge.train.eval import open_dataset, processes, run

        try:
            numbers = {int(v) for v in samples.split(",") if v.strip()}
        except ValueError:
            raise InvalidInputError(f"--samples must be integers separated by commas, got {samples!r}") from None
        counts = tuple(sorted(check_samples(n) for n in numbers))
        if not counts or (limit is not None and limit < 1) or worst < 0:
            raise InvalidInputError("--samples and --limit must be positive, --worst >= 0")
        _check_output(json_path, "--json")
        procs = processes(cpu=not device.startswith("cuda"))
        if synthetic and split is None:
            split = "test"
        dataset = open_dataset(data, split, synthetic, seed, count)
        if procs.count > 1 and device == "cuda":
            device = f"cuda:{procs.local_index}"
        segmenter = Segmenter.from_pretrained(bundle, backend=backend, device=device)
        if procs.is_main and not segmenter.bundle.trained:
            errors.print(f"note: bundle '{segmenter.bundle.name}' is untrained (weights from config); "
                         "expect scores near 0.", highlight=False)
        if synthetic:  # the report names the split and seed: tools regenerate the samples from them
            source = {"data": f"synthetic {split} split, seed {seed}, {count} samples",
                      "synthetic": {"split": split, "seed": seed, "count": count}}
        else:
            source = {"data": str(data) if split is None else f"{data} ({split})"}
        meta = {**source, "bundle": segmenter.bundle.name, "backend": segmenter.backend, "device": device}
        total = len(dataset) if limit is None else min(limit, len(dataset))
        with Progress(console=console, disable=not procs.is_main, transient=True) as bar:
            task = bar.add_task("evaluating", total=len(range(procs.index, total, procs.count)))
            report = run(segmenter, dataset, meta, counts, limit, json_path, plots, worst, procs,
                         progress=lambda done: bar.update(task, completed=done), all_queries=all_queries)
        if report is not None:
            _print_eval_summary(report)
            for path, what in ((json_path, "report"), (plots, "plots")):
                if path is not None:
                    console.print(f"wrote {what}: {path}", highlight=False)


def _print_eval_summary(report: dict) -> None:
    table = Table(title=f"{report['meta']['data']} ({report['meta']['bundle']})")
    for column in ("group", "N", "count", "gIoU", "cIoU"):
        table.add_column(column)

    def row(name: str, n: str, group: dict) -> None:
        cells = [f"{group[k]:.4f}" if group[k] is not None else "-" for k in ("giou", "ciou")]
        table.add_row(name, n, str(group["count"]), *cells)

    for n, summary in report["summary_by_samples"].items():
        row("all", n, summary)
    headline = report["summary"]
    largest = max(report["summary_by_samples"], key=int, default="-")
    for name, group in headline["per_type"].items():
        row(f"type {name}", largest, group)
    for name, group in headline["per_depth"].items():
        row(f"depth {name}", largest, group)
    console.print(table)


data_app = typer.Typer(help="Data sets: write the synthetic benchmark.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write train/, val/ and test/ into.")],
    seed: Annotated[int, typer.Option("--seed", help="Benchmark seed (splits use 3*seed+0/1/2).")] = 0,
    count: Annotated[int, typer.Option("--count", help="Training samples.")] = 5000,
    val_count: Annotated[int, typer.Option("--val-count", help="Validation samples (0: none).")] = 500,
    test_count: Annotated[int, typer.Option("--test-count", help="Test samples (0: none).")] = 500,
    min_size: Annotated[int, typer.Option("--min-size", help="Smallest image side.")] = 256,
    max_size: Annotated[int, typer.Option("--max-size", help="Largest image side.")] = 512,
    stage: Annotated[str, typer.Option("--stage", help="single | dense | reasoning | mixed")] = "reasoning",
    no_target: Annotated[float, typer.Option("--no-target", help="Share of no-target queries.")] = 0.1,
    debug: DebugOption = False,
) -> None:
    """Write the synthetic reasoning-segmentation benchmark in the ReasonSeg layout."""
    with _reported_errors(debug):
        from rich.progress import Progress

        from star_edge.errors import InvalidInputError
        from star_edge.train.data.synthetic import SyntheticConfig, write_split

        if seed < 0 or min(count, val_count, test_count) < 0:
            raise InvalidInputError("--seed and the counts must be >= 0")
        try:
            config = SyntheticConfig(size_range=(min_size, max_size), stage=stage,
                                     no_target_probability=no_target)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
        with Progress(console=console) as bar:
            for split, total in (("train", count), ("val", val_count), ("test", test_count)):
                if total:
                    task = bar.add_task(split, total=total)
                    folder = write_split(out, seed, split, total, config,
                                         progress=lambda done, task=task: bar.update(task, completed=done))
                    console.print(f"wrote {total} {split} samples to {folder}", highlight=False)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="The bundle folder to write (may be the --bundle folder).")],
    bundle: Annotated[Optional[Path], typer.Option(
        "--bundle", help="A bundle folder to export (default, without --base: the demo bundle).")] = None,
    base: Annotated[Optional[Path], typer.Option(
        "--base", help="Base Qwen2.5-VL / Qwen3-VL checkpoint folder (safetensors, tokenizer, processor).")] = None,
    adapter: Annotated[Optional[Path], typer.Option(
        "--adapter", help="LoRA adapter folder (peft: adapter_config.json + adapter_model.safetensors).")] = None,
    sam: Annotated[Optional[Path], typer.Option(
        "--sam", help="A bundle's sam/ folder, an official SAM .pth or an official SAM 2.1 .pt file.")] = None,
    input_size: Annotated[Optional[int], typer.Option(
        "--input-size", help="With --base: square reasoner input in px (default 840 for Qwen2.5-VL, 832 for Qwen3-VL).")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="With --base: most tokens per answer.")] = 1024,
    name: Annotated[Optional[str], typer.Option("--name", help="With --base: bundle name (default: the adapter folder's).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="With --base: auto (the checkpoint's) | float32 | bfloat16 | float16")] = "auto",
    onnx: Annotated[bool, typer.Option("--onnx", help="Export the reasoner and SAM to ONNX (onnx/ in the bundle).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Add dynamic-int8 decoders to the ONNX export (implies --onnx).")] = False,
    fp16: Annotated[bool, typer.Option("--fp16", help="Add fp16 decoders, for GPUs, to the ONNX export (implies --onnx).")] = False,
    tensorrt: Annotated[bool, typer.Option(
        "--tensorrt", help="Build TensorRT engines for this GPU (needs CUDA, TensorRT 10; implies --onnx).")] = False,
    engine_precision: Annotated[str, typer.Option(
        "--engine-precision", help="With --tensorrt: fp16 | fp32 engines.")] = "fp16",
    debug: DebugOption = False,
) -> None:
    """Write a bundle, from a bundle folder (the demo bundle by default) or from a base checkpoint with a
    LoRA adapter merged in plus a SAM model; optionally with ONNX graphs and TensorRT engines. Rerunning
    changes nothing."""
    with _reported_errors(debug):
        from star_edge.errors import InvalidInputError

        merged = (base, adapter, sam) != (None, None, None)
        if merged and bundle is not None:
            raise InvalidInputError("export takes --bundle or --base, --adapter and --sam, not both")
        if merged and None in (base, adapter, sam):
            raise InvalidInputError("--base, --adapter and --sam go together")
        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidInputError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        if tensorrt:  # fail before any slow step when TensorRT or CUDA is missing here
            from star_edge.tensorrt_runtime import detect_platform

            detect_platform("cuda")
        from star_edge.export.bundle_export import export_bundle

        def say(line: str) -> None:
            console.print(line, highlight=False)

        source = bundle
        if merged:
            from star_edge.export.merge import write_merged_bundle

            written, report = write_merged_bundle(base, adapter, out, sam, input_size=input_size,
                                                  max_new_tokens=max_new_tokens, name=name, dtype=dtype)
            say(f"merged {report.lora_modules} LoRA modules into {report.family} ({report.dtype}): "
                f"max |merged - unmerged| {report.max_abs_diff:.2e} on logits up to "
                f"{report.max_abs_logit:.2f}; the adapter moves them by up to {report.adapter_effect:.2f}")
            source = written.root
        elif source is None:
            from star_edge.defaults import default_bundle_path

            source = default_bundle_path()
        variants = ("fp32",) + (("int8",) if int8 else ()) + (("fp16",) if fp16 else ())
        written = export_bundle(source, out, onnx=onnx or int8 or fp16, variants=variants, tensorrt=tensorrt,
                                engine_precision=engine_precision, progress=say)
        say(f"wrote bundle '{written.name}' to {written.root} ({len(written.files)} files with sha256; "
            f"backends: {', '.join(written.backends)})")


@app.command()
def train(
    config: Annotated[str, typer.Option(
        "--config", help="A shipped config (tiny, stage1, stage2) or a YAML file.")],
    stage: Annotated[Optional[str], typer.Option("--stage", help="sft | 1 | 2 (default: the config's).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        "--max-steps", help="Train the stage up to this many optimiser steps in all.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Run folder (default runs/<config>); each stage writes its own subfolder.")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the stage's run in --out from its last checkpoint.")] = False,
    debug: DebugOption = False,
) -> None:
    """Train one stage (SFT warm start, GRPO Stage 1, GRPO Stage 2 with REST) and write its bundle."""
    with _reported_errors(debug):
        import os

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from star_edge.errors import InvalidInputError
        from star_edge.train.config import load_config
        from star_edge.train.run import train as train_stage

        if max_steps is not None and max_steps < 1:
            raise InvalidInputError(f"--max-steps must be >= 1, got {max_steps}")
        settings = load_config(config, stage)
        out = out if out is not None else Path("runs") / Path(config).stem
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, disable=os.environ.get("RANK", "0") != "0") as bar:
            task = bar.add_task(f"stage {settings.stage}", total=None, status="")

            def show(row: dict) -> None:
                shown = [f"{key} {row[key]:.4g}" for key in ("reward", "loss", "kl") if key in row]
                bar.update(task, status="  ".join(shown))

            result = train_stage(settings, out, max_steps, resume, on_log=show,
                                 on_progress=lambda step, total: bar.update(task, completed=step, total=total))
        console.print(f"stage {settings.stage}: {result.step} steps; metrics in {result.metrics}; bundle "
                      f"'{result.bundle.name}' in {result.bundle.root}", highlight=False)


@app.command()
def bench(
    bundle: BundleOption = None,
    samples: Annotated[str, typer.Option("--samples", help="Comma-separated sample counts.")] = "1,2,4,8",
    repeat: Annotated[int, typer.Option("--repeat", help="Timed calls per sample count.")] = 5,
    image: Annotated[Optional[Path], typer.Option("--image", help="Image file (default: a fixed test scene).")] = None,
    query: Annotated[str, typer.Option("--query", help="The query of every call.")] = "the red circle",
    adaptive: Annotated[bool, typer.Option("--adaptive", help="Time segment(adaptive=True).")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write the table as JSON here.")] = None,
    backend: BackendOption = "auto",
    device: Annotated[str, typer.Option("--device", help="cpu | cuda | cuda:N")] = "cpu",
    debug: DebugOption = False,
) -> None:
    """Time every stage of `segment` (p50 / p95 in ms) for a bundle."""
    with _reported_errors(debug):
        from star_edge.bench import STAGES, WARMUP_CALLS, bench_image, check_repeat, parse_sample_counts, run_bench
        from star_edge.images import load_image, validate_query
        from star_edge.segmenter import Segmenter

        counts = parse_sample_counts(samples)
        check_repeat(repeat)
        _check_output(json_path, "--json", image)
        pixels = load_image(image) if image is not None else bench_image()
        query = validate_query(query)
        segmenter = Segmenter.from_pretrained(bundle, backend=backend, device=device)
        rows = run_bench(segmenter, pixels, query, counts, repeat, adaptive=adaptive)
        table = Table(title=f"bundle {segmenter.bundle.name}: ms per stage, p50 / p95 over {repeat} calls")
        table.add_column("stage")
        for row in rows:
            drew = "" if row.samples_used == row.samples else f" (drew {row.samples_used:.1f})"
            table.add_column(f"N={row.samples}{drew}", justify="right")
        for stage in STAGES:
            table.add_row(stage, *(f"{row.p50[stage]:.0f} / {row.p95[stage]:.0f}" for row in rows))
        console.print(table)
        machine = _bench_machine(device)
        console.print(f"backend {segmenter.backend}, device {machine['device_name']}, torch threads "
                      f"{machine['torch_threads']}; SAM's embedding cache emptied before each call"
                      + ("; p95 of fewer than 20 calls is close to the slowest" if repeat < 20 else ""),
                      highlight=False)
        if json_path is not None:
            payload = {"bundle": segmenter.bundle.name, "backend": segmenter.backend, "device": device, "query": query,
                       "image_size": [int(pixels.shape[1]), int(pixels.shape[0])], "adaptive": adaptive,
                       "units": "ms, wall clock", "warmup_calls": WARMUP_CALLS,
                       "percentiles": "numpy linear interpolation over the timed calls",
                       "sam_embedding_cache": "emptied before every timed call",
                       "machine": machine, "rows": [row.to_json() for row in rows]}
            _write_file(json_path, lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
            console.print(f"wrote {json_path}")


def _bench_machine(device: str) -> dict[str, object]:
    """What a latency table needs beside its numbers: versions, the processor or GPU, threads."""
    import os
    import platform

    import numpy as np

    processor = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text(errors="replace").splitlines()
                 if line.startswith("model name")]
        processor = names[0] if names else processor
    machine: dict[str, object] = {"star_edge": __version__, "python": sys.version.split()[0],
                                  "numpy": np.__version__, "platform": platform.platform(), "processor": processor,
                                  "cpu_count": os.cpu_count(), "device_name": device, "torch_threads": None}
    for module in ("torch", "onnxruntime", "transformers"):
        if module in sys.modules:
            machine[module] = getattr(sys.modules[module], "__version__", None)
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        machine["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda") and torch.cuda.is_available():
            machine["device_name"] = torch.cuda.get_device_name(torch.device(device))
            machine["cuda"] = torch.version.cuda
    return machine


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


def _check_output(path: Path | None, option: str, source: Path | None = None, suffix: str | None = None) -> None:
    """Raise InvalidInputError before any model loads when `path` (an `option` output) cannot be
    written: a folder, under a file, the `source` input itself, or without the `suffix` it is written in."""
    from star_edge.errors import InvalidInputError
    from star_edge.paths import file_in_the_way

    if path is None:
        return
    if suffix is not None and path.suffix.lower() != suffix:
        raise InvalidInputError(f"{option} {path}: the file is written as {suffix[1:].upper()}; name it *{suffix}")
    try:
        if path.is_dir():
            raise InvalidInputError(f"{option} {path} is a folder; give a file name")
        above = file_in_the_way(path)
        if above is not None:
            raise InvalidInputError(f"{option} {path}: {above} is a file, not a folder")
        if source is not None and path.exists() and path.resolve() == source.resolve():
            raise InvalidInputError(f"{option} {path} is the input image; write the output elsewhere")
    except OSError as exc:  # a name too long, a folder on the way that cannot be searched
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _write_file(path: Path, write) -> None:  # noqa: ANN001
    from star_edge.errors import InvalidInputError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    except OSError as exc:
        raise InvalidInputError(f"cannot write {path}: {exc.strerror or exc}") from None


def main() -> None:
    """Entry point of the `star-edge` console script: a usage mistake (an unknown option, a missing
    argument, a value of the wrong type) is one line on stderr with exit status 2, like every error."""
    try:
        code = app(standalone_mode=False)
    except ClickException as exc:
        context = getattr(exc, "ctx", None)
        where = f" (see '{context.command_path} --help')" if context is not None else ""
        if exc.format_message():  # no arguments at all: the help was shown instead
            errors.print(f"[red]error:[/red] {escape(exc.format_message())}{escape(where)}", markup=True,
                         highlight=False)
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-C at a prompt
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
