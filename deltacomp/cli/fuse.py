"""``deltacomp fuse create|train|generate|eval``: several delta packages over one base, mixed by a gate."""

from __future__ import annotations

import functools
import json

import click

from deltacomp.cli import cli, handle_errors
from deltacomp.fusion.config import FusionConfig as FC
from deltacomp.fusion.config import TrainConfig as TC


def _quantize(load_in_4bit: bool, load_in_8bit: bool) -> str | None:
    from deltacomp.fusion.config import FusionError

    if load_in_4bit and load_in_8bit:
        raise FusionError("give --load-in-4bit or --load-in-8bit, not both")
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else None


def _runtime_options(fn):
    """Where and how the base runs: --device, --load-in-4bit, --load-in-8bit."""
    for deco in reversed([
        click.option("--device", default="cpu", show_default=True, help="cpu or cuda[:N]."),
        click.option("--load-in-4bit", is_flag=True, help="Quantize the base to 4-bit NF4 with bitsandbytes."),
        click.option("--load-in-8bit", is_flag=True, help="Quantize the base to 8-bit with bitsandbytes."),
    ]):
        fn = deco(fn)
    return fn


def _gate_options(fn):
    """The gate: --base, --delta ..., --gate and its settings (defaults from FusionConfig)."""
    for deco in reversed([
        click.option("--base", required=True, help="The base model (folder or Hub repo id)."),
        click.option("--delta", "deltas", multiple=True, required=True,
                     help="A delta package (folder or Hub id) made from BASE; repeat for each delta."),
        click.option("--gate", default=FC.gate, show_default=True, help="static, token, sentence or topk."),
        click.option("--weights", default=None, help="static: one weight per delta, e.g. 0.7,0.3."),
        click.option("--allow-negative", is_flag=True, help="static: allow weights below zero."),
        click.option("--top-k", type=int, default=FC.top_k, show_default=True, help="topk: deltas per token."),
        click.option("--top-p", type=float, default=FC.top_p, show_default=True,
                     help="sentence: probability mass of the deltas kept."),
        click.option("--temperature", type=float, default=FC.temperature, show_default=True,
                     help="token, topk: softmax temperature."),
        click.option("--stored", default=FC.stored, show_default=True,
                     help="Tensors a package stores whole: mix (the gate's static weights, else 1/k each), base, "
                          "or a delta's index (0-based)."),
        click.option("-o", "--output", required=True, help="The gate folder to write."),
        click.option("--overwrite", is_flag=True, help="Replace an existing gate folder."),
    ]):
        fn = deco(fn)
    return fn


def _config(deltas, gate, weights, allow_negative, top_k, top_p, temperature, stored, **extra):
    from deltacomp.fusion.config import FusionConfig, parse_weights

    return FusionConfig(gate=gate, num_deltas=len(deltas), weights=parse_weights(weights) if weights else None,
                        allow_negative=allow_negative, top_k=top_k, top_p=top_p, temperature=temperature,
                        stored=stored, **extra)


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


@cli.group()
def fuse():
    """Fuse several delta packages over one base with a gate: static, token, sentence or topk."""


@fuse.command()
@_gate_options
@_runtime_options
@handle_errors
def create(base, deltas, gate, weights, allow_negative, top_k, top_p, temperature, stored, output, overwrite,
           device, load_in_4bit, load_in_8bit):
    """Write a gate folder without training (static weights, or a gate's initial state)."""
    from deltacomp.fusion import FusionModel
    from deltacomp.io.output import check_output

    config = _config(deltas, gate, weights, allow_negative, top_k, top_p, temperature, stored)
    quantize = _quantize(load_in_4bit, load_in_8bit)
    check_output(output, overwrite)
    fm = FusionModel.from_packages(base, deltas, config, device=device, quantize=quantize)
    fm.save(output, overwrite)
    click.echo(f"wrote {output} ({config.gate} gate over {len(deltas)} deltas)")


@fuse.command()
@_gate_options
@click.option("--data", required=True, help="Training data: prompt/answer JSON lines, chat JSON lines or text.")
@click.option("--epochs", type=int, default=TC.epochs, show_default=True)
@click.option("--lr", type=float, default=TC.lr, show_default=True)
@click.option("--batch-size", type=int, default=TC.batch_size, show_default=True, help="Examples per step.")
@click.option("--holdout", type=float, default=TC.holdout, show_default=True,
              help="Fraction of the examples kept out of training and scored at the end.")
@click.option("--max-length", type=int, default=TC.max_length, show_default=True, help="Tokens per example.")
@click.option("--route-weight", type=float, default=FC.route_weight, show_default=True,
              help="topk: weight of the routing loss towards each example's task.")
@click.option("--seed", type=int, default=TC.seed, show_default=True)
@_runtime_options
@click.option("--progress/--no-progress", default=None, help="Show a progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the training summary as JSON.")
@handle_errors
def train(base, deltas, gate, weights, allow_negative, top_k, top_p, temperature, stored, output, overwrite, data,
          epochs, lr, batch_size, holdout, max_length, route_weight, seed, device, load_in_4bit, load_in_8bit,
          progress, as_json):
    """Train a gate on DATA (only the gate's parameters change) and write its folder."""
    from deltacomp.fusion import FusionModel, TrainConfig, read_examples
    from deltacomp.io.output import check_output

    config = _config(deltas, gate, weights, allow_negative, top_k, top_p, temperature, stored,
                     route_weight=route_weight)
    tconfig = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, max_length=max_length,
                          seed=seed)
    quantize = _quantize(load_in_4bit, load_in_8bit)
    check_output(output, overwrite)
    fm = FusionModel.from_packages(base, deltas, config, device=device, quantize=quantize)
    examples = read_examples(data, fm.tokenizer)
    summary = fm.train_gate(examples, tconfig, progress=progress)
    fm.save(output, overwrite)
    if as_json:
        click.echo(json.dumps({"output": output, **summary}, indent=2))
        return
    click.echo(f"trained the {gate} gate on {summary['examples']} examples ({summary['steps']} steps); "
               f"last epoch loss {_fmt(summary['epoch_loss'][-1])}, held-out loss {_fmt(summary['heldout_loss'])} "
               f"on {summary['heldout_examples']} examples")
    click.echo(f"wrote {output}")


def _load_options(fn):
    @click.argument("gate_folder", metavar="GATE")
    @click.option("--base", default=None, help="The base, when not at the path the gate records.")
    @click.option("--delta", "deltas", multiple=True, help="The deltas in order, when not where the gate records.")
    @_runtime_options
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


def _load(gate_folder, base, deltas, device, load_in_4bit, load_in_8bit):
    from deltacomp.fusion import FusionModel

    return FusionModel.load(gate_folder, base=base, deltas=list(deltas) or None, device=device,
                            quantize=_quantize(load_in_4bit, load_in_8bit))


@fuse.command()
@_load_options
@click.option("--prompt", "prompts", multiple=True, required=True, help="A prompt; repeat for a batch.")
@click.option("--max-new-tokens", type=int, default=64, show_default=True)
@click.option("--cache/--no-cache", default=True, show_default=True, help="Decode with the KV cache.")
@click.option("--json", "as_json", is_flag=True, help="Print prompts and continuations as JSON.")
@handle_errors
def generate(gate_folder, base, deltas, device, load_in_4bit, load_in_8bit, prompts, max_new_tokens, cache,
             as_json):
    """Greedy continuations of the prompts by the fused model of GATE."""
    from deltacomp.fusion.config import FusionError

    if max_new_tokens < 1:
        raise FusionError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    fm = _load(gate_folder, base, deltas, device, load_in_4bit, load_in_8bit)
    outs = fm.generate(list(prompts), max_new_tokens=max_new_tokens, use_cache=cache)
    if as_json:
        click.echo(json.dumps([{"prompt": p, "output": o} for p, o in zip(prompts, outs)], indent=2))
        return
    for p, o in zip(prompts, outs):
        click.echo(f"{p}{o}")


@fuse.command("eval")
@_load_options
@click.option("--data", required=True, help="Prompt/answer JSON lines, chat JSON lines or text.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Examples scored per forward pass.")
@click.option("--exact/--no-exact", default=True, show_default=True, help="Also score exact match (generates).")
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@handle_errors
def eval_(gate_folder, base, deltas, device, load_in_4bit, load_in_8bit, data, batch_size, exact, as_json):
    """Loss and exact match on DATA: the fused model vs each delta alone vs the base."""
    from deltacomp.fusion import read_examples
    from deltacomp.fusion.config import FusionError
    from deltacomp.report import format_table

    if batch_size < 1:
        raise FusionError(f"--batch-size must be >= 1, got {batch_size}")
    fm = _load(gate_folder, base, deltas, device, load_in_4bit, load_in_8bit)
    examples = read_examples(data, fm.tokenizer)
    result = fm.evaluate(examples, batch_size=batch_size, exact=exact)
    if as_json:
        click.echo(json.dumps({"data": data, **result}, indent=2))
        return
    click.echo(f"data: {data}, {result['examples']} examples")
    click.echo(format_table(["model", "loss", "exact match"],
                            [[r["model"], _fmt(r["loss"]), _fmt(r["exact_match"], ".3f")] for r in result["rows"]]))
