"""The ``pcbedge`` command: a thin click shell over :mod:`pcbedge.api`.

Each command parses its options and calls one API verb. Heavy libraries are imported inside the
verbs, so ``pcbedge --help`` and ``pcbedge targets`` never load torch, onnx or tensorrt. A
:class:`~pcbedge.errors.PcbEdgeError` becomes ``error: <message>`` on stderr and the error's own
exit code (docs/errors.md), without a traceback.
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from pcbedge import __version__
from pcbedge.errors import BundleError, DependencyError, GateFailed, PcbEdgeError

EXIT_INTERRUPTED = 130   # 128 + SIGINT, as a shell reports Ctrl-C
EXIT_TERMINATED = 143    # 128 + SIGTERM
# Top-level modules of the optional extras -> the extra that installs them (pyproject.toml).
OPTIONAL_MODULES = {"torch": "export", "onnx": "export", "onnxscript": "export",
                    "safetensors": "export", "transformers": "export",
                    "onnx_graphsurgeon": "export", "tensorrt": "tensorrt", "polygraphy": "tensorrt"}


class _Group(click.Group):
    """Maps typed errors to their exit codes inside click, so ``main()`` and click's test runner
    behave the same."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PcbEdgeError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except ModuleNotFoundError as e:
            extra = OPTIONAL_MODULES.get((e.name or "").split(".")[0])
            if extra is None:
                raise
            err = DependencyError(f"{e.name} is not installed; this command needs the [{extra}] "
                                  "extra", fix=f"pip install 'pcbedge[{extra}]'")
            click.echo(f"error: {err}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt as e:   # Ctrl-C, or SIGTERM (Terminated) under main()
            click.echo(_interrupted_message(e), err=True)
            ctx.exit(getattr(e, "exit_code", EXIT_INTERRUPTED))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcbedge")
def cli() -> None:
    """Deploy the PCB-inspection VLM to edge targets: export, build, bench, ask."""


@cli.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="Fine-tuned model folder (default: the shipped reference model).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bundles/export"),
              show_default=True, help="Folder for the ONNX graphs and manifest.")
@click.option("--overwrite", is_flag=True,
              help="Replace an --out bundle made by pcbedge (never any other folder).")
@click.option("--no-check", is_flag=True, help="Skip the ONNX-vs-PyTorch comparison.")
@click.option("--precision", default="fp32", show_default=True,
              help="The graphs' float type: fp32, fp16 (half the files and the export's "
                   "memory; build widens it back) or bf16 (unchecked: needs --no-check).")
def export(model_dir, out_dir, overwrite, no_check, precision) -> None:
    """Export a model to checked ONNX graphs + manifest.

    Needs the [export] extra."""
    from pcbedge import api
    out = api.export_model(model_dir, out_dir, overwrite=overwrite, check=not no_check,
                           precision=precision)
    click.echo(f"exported to {out}")


def _threads_option(ctx, param, value):
    """--threads checked against this machine's cores before anything is loaded or written."""
    if value is not None:
        from pcbedge.runtime.sessions import check_threads
        check_threads(value)
    return value


def _verify_on_open(verify_key, bundle) -> None:
    """With --verify, the bundle must be signed by that key when the command opens it."""
    if verify_key is None:
        return
    if bundle is None:
        raise click.UsageError("--verify checks a bundle's signature: pass a BUNDLE")
    from pcbedge.bundle.signing import check_signed, trusting
    key = click.get_current_context().with_resource(trusting(verify_key, bundle))
    check_signed(bundle, key)   # now, before anything is loaded or written


@cli.command()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for sign_key.pem (private) and verify_key.pem (public).")
def keygen(out_dir) -> None:
    """Make an Ed25519 key pair for signing bundles (build --sign, ask/bench --verify)."""
    from pcbedge.bundle.signing import generate_keys, load_verify_key
    private, public = generate_keys(out_dir)
    click.echo(f"private key {private} (keep it on the build machine; build --sign {private})")
    click.echo(f"public key {public}, id {load_verify_key(public).key_id} (copy it to the "
               f"devices; ask --verify {public}, or PCBEDGE_VERIFY_KEY={public})")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--key", "sign_key", required=True, type=click.Path(path_type=Path),
              help="Ed25519 private key (PEM; pcbedge keygen).")
def sign(bundle, sign_key) -> None:
    """Sign an existing bundle or export (writes BUNDLE/manifest.sig, after checking every
    file against the manifest)."""
    from pcbedge.bundle.signing import sign_bundle
    click.echo(f"signed: {sign_bundle(bundle, sign_key)}")


@cli.command()
@click.option("--target", required=True, help="A target name (pcbedge targets) or a .toml path.")
@click.option("--export", "export_dir", type=click.Path(path_type=Path),
              default=Path("bundles/export"), show_default=True, help="Output of pcbedge export.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="DeepPCB-layout boards for INT8 calibration (default: the shipped sample).")
@click.option("--calibration-list", type=click.Path(path_type=Path),
              help="List file of --calibration's boards to draw from (e.g. the train side).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Bundle folder (default: bundles/<target>).")
@click.option("--keep-ratio", type=float, help="Override the profile's visual-token keep ratio.")
@click.option("--overwrite", is_flag=True,
              help="Replace an --out bundle made by pcbedge (never any other folder).")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path),
              help="Sign the bundle with this Ed25519 private key (PEM; pcbedge keygen).")
def build(target, export_dir, calibration, calibration_list, out_dir, keep_ratio,
          overwrite, sign_key) -> None:
    """Build a deployable bundle for a target from an export."""
    from pcbedge import api
    from pcbedge.targets import load_target
    load_target(target)  # a wrong target fails here, before the quantizers are imported
    out = api.build_bundle(target, export_dir, out_dir, calibration=calibration,
                           calibration_list=calibration_list, keep_ratio=keep_ratio,
                           overwrite=overwrite, sign_key=sign_key)
    click.echo(f"bundle written to {out}")


GATE_OPTIONS = ("p95_ms_max", "max_map_drop", "max_count_drop", "max_hallucination_rise", "min_map",
                "max_question_drop")
# pcbedge.benchmarks.compare.REGRESSION_GATES, written out so --help stays light
REGRESSION_OPTIONS = ("max_p50_regression_pct", "max_p95_regression_pct",
                      "max_question_accuracy_drop", "max_count_match_drop", "max_agreement_drop")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", type=click.Path(path_type=Path), help="DeepPCB-layout board folder.")
@click.option("--list", "list_file", type=click.Path(path_type=Path), help="List file of boards.")
@click.option("--reference", type=click.Path(path_type=Path), help="Bundle to compare against.")
@click.option("--no-reference", is_flag=True,
              help="Run no FP32 reference (too large for this box): drift gates skipped.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report folder.")
@click.option("--queries", type=click.IntRange(min=1), help="Timed queries.")
@click.option("--min-seconds", type=click.FloatRange(min=0), help="Minimum timed duration.")
@click.option("--p95-ms-max", type=float, help="Gate override: p95 latency (ms).")
@click.option("--max-map-drop", type=float, help="Gate override: mAP drop vs the reference.")
@click.option("--max-count-drop", type=float, help="Gate override: count-accuracy drop.")
@click.option("--max-hallucination-rise", type=float, help="Gate override: hallucination rise.")
@click.option("--max-question-drop", type=float,
              help="Gate override: largest accuracy drop of a question kind vs the reference.")
@click.option("--min-map", type=float, help="Gate override: absolute mAP floor.")
@click.option("--sweep", is_flag=True, help="Also sweep the pruning keep ratio.")
@click.option("--robustness", is_flag=True, help="Also run the image-corruption checks.")
@click.option("--boards", "max_boards", type=click.IntRange(min=1), help="Use at most N boards.")
@click.option("--warmup", type=click.IntRange(min=0), help="Untimed queries before timing.")
@click.option("--threads", type=click.IntRange(min=1), callback=_threads_option,
              help="CPU threads (default: the profile's; at most 4 per core).")
@click.option("--verify", "verify_key", type=click.Path(path_type=Path),
              help="Refuse the bundle unless signed by this Ed25519 public key (PEM).")
@click.option("--quiet", is_flag=True, help="No progress bars or summary table.")
@click.option("--compare", "baseline", type=click.Path(path_type=Path),
              help="A previous run's report.json: differences with their uncertainty.")
@click.option("--max-p50-regression-pct", type=float, help="Vs --compare: P50 rise allowed (%).")
@click.option("--max-p95-regression-pct", type=float, help="Vs --compare: P95 rise allowed (%).")
@click.option("--max-question-accuracy-drop", type=float,
              help="Vs --compare: question accuracy drop allowed.")
@click.option("--max-count-match-drop", type=float, help="Vs --compare: count match drop allowed.")
@click.option("--max-agreement-drop", type=float,
              help="Vs --compare: FP32 answer agreement drop allowed.")
@click.option("--busy-machine", type=click.Choice(["flag", "refuse"]),
              help="On a busy machine: time and flag, or refuse (exit 4). Default: the profile's.")
@click.option("--resume", is_flag=True,
              help="Keep each board's answers in OUT/answers and reuse those of an interrupted "
                   "run into the same --out (long runs on slow devices).")
@click.option("--max-new-tokens", type=click.IntRange(min=1),
              help="Cap on each answer's generated tokens (default 64).")
def bench(bundle, data, list_file, reference, no_reference, out_dir, queries, min_seconds, sweep,
          robustness, max_boards, warmup, threads, quiet, baseline, busy_machine, verify_key,
          resume, max_new_tokens, **gate_values) -> None:
    """Measure a bundle's latency and accuracy drift against gates.

    Writes report.json, report.html, junit.xml and summary.md. Exits with code 3 when a gate is
    missed, 4 when the machine is busy and the profile (or --busy-machine) says refuse."""
    from pcbedge import api
    if no_reference and reference is not None:
        raise click.UsageError(f"--reference {reference} and --no-reference contradict each "
                               "other: pass one")
    if no_reference:
        reference = False
    gates = {k: v for k, v in gate_values.items() if k in GATE_OPTIONS and v is not None}
    regression = {k: v for k, v in gate_values.items() if k in REGRESSION_OPTIONS
                  and v is not None}
    extra = {k: v for k, v in (("compare", baseline), ("regression_gates", regression or None),
                               ("busy_machine", busy_machine)) if v is not None}
    _verify_on_open(verify_key, bundle)
    report = api.run_benchmark(bundle, data=data, list_file=list_file, reference=reference,
                               out_dir=out_dir, queries=queries, min_seconds=min_seconds,
                               gates=gates, sweep=sweep, robustness=robustness,
                               max_boards=max_boards, warmup=warmup, threads=threads,
                               progress=not quiet, resume=resume,
                               max_new_tokens=max_new_tokens, **extra)
    if not report["passed"]:
        raise GateFailed(f"benchmark of {bundle}: gate(s) missed: {_failed_gates(report)}",
                         fix="see the report; rebuild with another recipe or relax the gate")
    click.echo(f"benchmark of {bundle}: all gates passed")


def _failed_gates(report: dict) -> str:
    gates = report.get("gates")
    if isinstance(gates, dict):
        failed = [name for name, g in gates.items()
                  if isinstance(g, dict) and g.get("passed") is False]
        if failed:
            return ", ".join(failed)
    return "see the report"


@cli.command()
@click.argument("args", nargs=-1, metavar="[BUNDLE] [QUESTION]")
@click.option("--model", type=click.Path(path_type=Path),
              help="PyTorch model folder, used when no BUNDLE is given.")
@click.option("--image", type=click.Path(path_type=Path), help="The board (test) image.")
@click.option("--template", type=click.Path(path_type=Path),
              help="The golden template image (optional for families that can read the board alone).")
@click.option("--json", "as_json", is_flag=True, help="Print the full answer JSON.")
@click.option("--show", type=click.Path(path_type=Path),
              help="Write the board image with the answer's boxes drawn (e.g. out.png).")
@click.option("--batch", type=click.Path(path_type=Path),
              help='JSONL of {"id", "image", "template", "question"} lines; relative image paths '
                   "are relative to the JSONL's folder.")
@click.option("--out", type=click.Path(path_type=Path), help="JSONL answers for --batch.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), help="Answer length limit.")
@click.option("--threads", type=click.IntRange(min=1), callback=_threads_option,
              help="CPU threads for the runner (at most 4 per core).")
@click.option("--verify", "verify_key", type=click.Path(path_type=Path),
              help="Refuse the bundle unless signed by this Ed25519 public key (PEM).")
def ask(args, model, image, template, as_json, show, batch, out, max_new_tokens, threads,
        verify_key) -> None:
    """Ask a question about a board. BUNDLE is a bundle folder (ONNX Runtime); without it,
    --model or the shipped reference model (PyTorch) answers."""
    bundle, question = _split_ask_args(args)
    if bundle is not None and model is not None:
        raise click.UsageError("pass either BUNDLE or --model, not both")
    if batch is None:
        _check_single_ask(image, template, question, out)
        if show is not None:   # the drawing never replaces the board or its template
            from pcbedge.bundle.outputs import check_outside_inputs
            check_outside_inputs(show, {"board image": image, "template": template})
        fmt = _image_format(show) if show is not None else None
    else:
        if out is None or any(v is not None for v in (image, template, question, show)):
            raise click.UsageError("--batch needs --out, and takes the image, template and "
                                   "question from each line (drop --image, --template, QUESTION "
                                   "and --show)")
        items = _read_batch(batch, out)  # a bad line fails before the model is loaded
    from pcbedge import api
    _verify_on_open(verify_key, bundle)
    runner = api.load_runner(bundle or model, threads=threads)
    if batch is None and template is None and not getattr(runner, "template_optional", False):
        raise click.UsageError("pass --image and --template (this bundle's model reads both)")
    kw = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if batch is not None:
        _run_batch(runner, items, batch, out, kw)
        click.echo(f"wrote {len(items)} answers to {out}", err=True)
        return
    ans = runner.ask(image, template, question, **kw)
    click.echo(json.dumps(ans, indent=2, default=_jsonable) if as_json else ans["answer"])
    if show is not None:
        from pcbedge.runtime.draw import draw_answer
        draw_answer(image, ans, show, fmt)
        click.echo(f"drawn answer written to {show}", err=True)


def _split_ask_args(args: tuple[str, ...]) -> tuple[Path | None, str | None]:
    """``[BUNDLE] [QUESTION]``: one argument is the bundle if it is a folder, else the question."""
    if len(args) > 2:
        raise click.UsageError("ask takes at most BUNDLE and QUESTION; quote the question")
    if len(args) == 2:
        if not Path(args[0]).is_dir():
            raise BundleError(f"bundle folder {args[0]} not found",
                              fix=f"pass a bundle from pcbedge build; if {' '.join(args)!r} is "
                                  "the question, quote it")
        return Path(args[0]), args[1]
    if len(args) == 1:
        arg = args[0]
        if Path(arg).is_dir():
            return Path(arg), None
        if not any(c.isspace() for c in arg) and ("/" in arg or os.sep in arg):
            raise BundleError(f"bundle folder {arg} not found",
                              fix="pass a bundle from pcbedge build")
        return None, arg
    return None, None


def _check_single_ask(image, template, question, out) -> None:
    if out is not None:
        raise click.UsageError("--out goes with --batch; use --show to save a drawn answer")
    if image is None:   # --template is optional for runners that say so
        raise click.UsageError("pass --image and --template (or --batch IN.jsonl --out OUT.jsonl)")
    if question is None:
        raise click.UsageError("missing QUESTION, e.g. 'where are the shorts?'")


def _jsonable(obj):
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _read_batch(path: Path, out: Path | None = None) -> list[tuple[int, dict]]:
    """Every line of a batch JSONL checked before any is answered
    (:func:`pcbedge.runtime.batch.read_batch`)."""
    from pcbedge.runtime.batch import read_batch
    return read_batch(path, out)


def _run_batch(runner, items, batch: Path, out: Path, kw: dict) -> None:
    """The answers, one JSON line each, written atomically to ``out``."""
    from pcbedge.runtime.batch import run_batch
    run_batch(runner, items, batch, out, kw, default=_jsonable)


def _image_format(path: Path) -> str:
    from PIL import Image
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt not in ("PNG", "JPEG", "WEBP", "BMP", "TIFF"):
        raise click.BadParameter(f"{path} must end in .png, .jpg, .webp, .bmp or .tif",
                                 param_hint="--show")
    return fmt


@cli.command()
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=Path),
              help="DeepPCB-layout folder with trainval.txt.")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for the trained model (Hugging Face layout).")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--minutes-a", type=click.FloatRange(min=0, min_open=True),
              help="Time budget of stage A (vision).")
@click.option("--minutes-b", type=click.FloatRange(min=0, min_open=True),
              help="Time budget of stage B (decoder).")
@click.option("--split", type=click.Choice(["trainval", "designs"]),
              help="trainval (default): the last 20% of every group validates; designs: the "
                   "held-out groups (docs/data.md) are never trained on and calibrate.")
@click.option("--scale-jitter", type=click.FloatRange(min=0, max=1, max_open=True),
              help="Layout augmentation: crops scaled by up to 1 +/- this (e.g. 0.25; "
                   "docs/data.md). Default 0.")
@click.option("--p-line", type=click.FloatRange(min=0, max=1),
              help="Layout augmentation: share of crops with copper lines 1 px wider or "
                   "narrower. Default 0.")
@click.option("--p-paste", type=click.FloatRange(min=0, max=1),
              help="Layout augmentation: share of crops given 1-2 training defects pasted "
                   "from other boards. Default 0.")
@click.option("--hard-mining", type=click.FloatRange(min=0, max=1),
              help="Stage A: share of crops centred on the defects the head still scores "
                   "worst (e.g. 0.5). Default 0.")
@click.option("--checkpoint-minutes", type=click.FloatRange(min=0),
              help="Save each stage's state to OUT/stage_*.resume.pt this often (0 = never). "
                   "Default 10.")
@click.option("--resume", is_flag=True, default=None,
              help="Continue a run that was killed, from its saved state, with the same "
                   "options; stages already saved are not trained again.")
def finetune(data_dir, out_dir, seed, minutes_a, minutes_b, split, scale_jitter, p_line,
             p_paste, hard_mining, checkpoint_minutes, resume) -> None:
    """Train the reference PCB VLM on a DeepPCB-layout folder.

    Trains from scratch on the train part of its trainval.txt."""
    from pcbedge import api
    given = {"seed": seed, "minutes_a": minutes_a, "minutes_b": minutes_b, "split": split,
             "scale_jitter": scale_jitter, "p_line": p_line, "p_paste": p_paste,
             "hard_mining": hard_mining, "checkpoint_minutes": checkpoint_minutes, "resume": resume}
    api.finetune(data_dir, out_dir, **{k: v for k, v in given.items() if v is not None})
    click.echo(f"model saved to {out_dir}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--target", help="A target name or .toml path (default: the bundle's own).")
@click.option("--new-tokens", type=click.IntRange(min=1),
              help="Tokens a typical answer generates (default: the family's).")
@click.option("--keep-ratio", type=click.FloatRange(min=0, min_open=True, max=1),
              help="Visual-token keep ratio (default: the bundle's).")
@click.option("--json", "json_out", type=click.Path(path_type=Path),
              help="Also write the whole plan as JSON to this file.")
def plan(bundle, target, new_tokens, keep_ratio, json_out) -> None:
    """Predict a bundle's per-stage latency and memory on a target, before buying it."""
    from pcbedge import api
    from pcbedge.plan.report import print_plan, write_plan_json
    typical = {k: v for k, v in (("new_tokens", new_tokens), ("keep_ratio", keep_ratio))
               if v is not None}
    result = api.plan(bundle, target, **typical)
    if json_out is not None:
        write_plan_json(json_out, result, inputs={"bundle": bundle})
    print_plan(result, click.echo)


@cli.command()
def targets() -> None:
    """List the shipped target profiles."""
    from pcbedge import api
    header = ("NAME", "RUNTIME", "VISION/DECODER", "PRUNING", "THREADS", "P95 BUDGET",
              "DESCRIPTION")
    rows = [header] + [(
        t.name, t.runtime, f"{t.precision.vision}/{t.precision.decoder}",
        "none" if t.pruning.method == "none" else f"{t.pruning.method} {t.pruning.keep_ratio:g}",
        "default" if t.threads is None else str(t.threads), f"{t.latency_budget_ms:g} ms",
        t.description) for t in api.list_targets()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, like Ctrl-C's KeyboardInterrupt: every cleanup
    that runs on Ctrl-C (staging folders, temporary files) runs on SIGTERM too, and
    ``except Exception`` handlers do not swallow it."""

    exit_code = EXIT_TERMINATED


def _on_sigterm(signum, frame) -> None:
    # a second SIGTERM must not interrupt the cleanup the first one started (SIGKILL still can)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def _interrupted_message(e: BaseException) -> str:
    # Ctrl-C leaves the terminal's cursor after "^C": start a new line
    return "terminated (SIGTERM)" if isinstance(e, Terminated) else "\ninterrupted"


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``pcbedge``). Exit codes: docs/errors.md (130 on Ctrl-C, 143 on
    SIGTERM, each after the same cleanup and a one-line message)."""
    import threading
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="pcbedge")
    except PcbEdgeError as e:  # raised outside a command (callbacks): the same contract
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt as e:
        click.echo(_interrupted_message(e), err=True)
        sys.exit(getattr(e, "exit_code", EXIT_INTERRUPTED))
    finally:
        if previous is not None:   # main() called in-process (tests) leaves no handler behind
            signal.signal(signal.SIGTERM, previous)
