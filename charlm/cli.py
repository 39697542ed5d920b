"""What train.py and sample.py run once Hydra has composed their config: validate, call, report.

Model, data and training code know nothing of Hydra; this module converts the composed config
into the plain dataclasses of charlm.config once, and turns user errors into one clear line.
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from charlm.config import Config, EvaluateConfig, SampleConfig, path_keys
from charlm.errors import CharlmError, fail

EVALUATE_SEQ_LEN = 512  # bytes per window for evaluate.py (one stream: the window only sets the work per call)

# The schemas the YAML files in configs/ are checked against: a typo'd key or a wrong type
# stops the run at start-up.
_store = ConfigStore.instance()
_store.store(name="train_schema", node=Config)
_store.store(name="sample_schema", node=SampleConfig)
_store.store(name="evaluate_schema", node=EvaluateConfig)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
SCHEMAS = {"train": Config, "sample": SampleConfig, "evaluate": EvaluateConfig}
MODEL_SHAPE = ("d_model", "n_layers", "cell")  # what a checkpoint's weights fix (resume, init_from)


def settings_help(schema: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default as shown, help) for every setting of schema, sections flattened (train.lr)."""
    rows = []
    types = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(types[f.name]):  # a section: data, model, train
            rows += settings_help(types[f.name], f"{prefix}{f.name}.")
            continue
        shown = f.metadata.get("shown") or show_value(f.default)
        rows.append((prefix + f.name, shown, f.metadata.get("help", "")))
    return rows


def show_value(value: Any) -> str:
    """A default as --help and the README write it: true/false, 0.003, 1e-05."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _plain(markdown: str) -> str:
    """README markdown as terminal text: no backticks, a link as its words."""
    return re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", markdown).replace("`", "")


def help_text(usage: str, schema: type, groups: Optional[dict[str, list[str]]] = None) -> str:
    """usage, then every setting as `key=default` over its help (what --help prints)."""
    lines = [usage.strip(), ""]
    if groups:
        lines.append("config groups (each choice a file in configs/<group>/):")
        lines += [f"  {group}=  one of {', '.join(options)}" for group, options in groups.items()]
        lines.append("")
    rows = settings_help(schema)
    lines.append("settings (key=value; the default after =):" if rows else "settings: none")
    for key, default, text in rows:
        lines += [f"  {key}={_plain(default)}", f"      {_plain(text)}"]
    return "\n".join(lines)


def _group_choices(config_name: str) -> dict[str, list[str]]:
    groups = ("data", "recipe", "model") if config_name == "train" else ("data",) if config_name == "evaluate" else ()
    return {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in groups}


def parse_settings(schema: type, argv: list[str], usage: str) -> Any:
    """`key=value` arguments as a schema instance, for the `python -m charlm.X` tools; None after
    printing the help for -h/--help. A bad argument raises CharlmError naming it."""
    prog = usage.strip().split(":")[0]
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(usage, schema))
        return None
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            raise CharlmError(f"{arg!r} is not a key=value setting; `{prog} --help` lists them")
    argv = [prog, *argv]
    raw = pop_raw_args(argv, path_keys(schema))  # file names: as typed, not read as YAML
    try:
        given = OmegaConf.from_dotlist(argv[1:])
    except OmegaConfBaseException as e:
        raise CharlmError(str(e).splitlines()[0]) from None
    return _to_object(with_raw(given, raw), schema, prog)


def check_overrides(config_name: str, argv: list[str], usage: str) -> None:
    """Compose the config once up front so that a bad override ends in one line, not Hydra's page.

    -h/--help prints usage and every setting with its default and help; Hydra's other flags
    (--cfg, -m, --hydra-help, ...) are left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException

    overrides = argv[1:]
    if any(a in ("-h", "--help") for a in overrides):
        print(help_text(usage, SCHEMAS[config_name], _group_choices(config_name)))
        sys.exit(0)
    if config_name == "train":
        _check_recipe_choices(overrides)
    if any(a.startswith("-") for a in overrides):
        return
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=overrides)
    except MissingConfigException as e:
        options = getattr(e, "options", None) or []
        missing = getattr(e, "missing_cfg_file", "") or str(e).splitlines()[0]
        group, _, name = str(missing).partition("/")
        fail(f"{group}={name} is not a config; choose one of: {', '.join(options)}" if options
             else str(e).splitlines()[0])
    except HydraException as e:
        cause = e.__cause__
        key = getattr(cause, "full_key", None)
        if key and "not in" in str(cause):
            fail(f"{key} is not a setting; `python {config_name}.py --help` lists them all")
        if key:
            fail(f"{key}: {str(cause).splitlines()[0]}")
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        fail(" ".join(lines[:2]) + " (quote free text: key='a, b')")


def _check_recipe_choices(overrides: list[str]) -> None:
    """recipe=... (and model=...) name files that must exist. configs/train.yaml marks recipe
    optional (a corpus without one takes the defaults), and Hydra skips a missing optional choice
    without a word, so a misspelt one is caught here (sweeps' a,b,c included)."""
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key == "train":
            fail(f"{arg}: train holds settings (train.lr=...); a corpus's model and schedule are chosen"
                 f" with recipe=<corpus>")
        if sep and key in ("recipe", "model"):
            options = sorted(p.stem for p in (CONFIG_DIR / key).glob("*.yaml"))
            for choice in value.split(","):
                if choice not in options:
                    fail(f"{key}={choice} is not a config; choose one of: {', '.join(options)}")


def _to_object(cfg: DictConfig, schema: type, prog: str = "") -> Any:
    """The composed config as plain dataclass instances (runs their validation); prog names the
    command whose --help lists the settings, for a key that is not one."""
    try:
        # Through a plain container: a schema-typed config would carry `+key=...` additions along.
        plain = OmegaConf.to_container(cfg, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        key = getattr(e, "full_key", None)
        if "Missing mandatory value" in msg and key:
            msg = f"{key} needs a value: add {key}=..."
        elif prog and key and " not in " in msg:
            msg = f"{key} is not a setting; `{prog} --help` lists them"
        elif key and key not in msg:
            msg = f"{key}: {msg}"
        raise CharlmError(msg) from None


def _guarded(fn: Callable[[], Any]) -> Any:
    """Run fn; a CharlmError becomes one line on stderr and exit status 1."""
    try:
        return fn()
    except CharlmError as e:
        fail(str(e))


def _resume_config(cfg: DictConfig, overrides: list[str], raw: dict[str, str]) -> tuple[Config, dict[str, Any]]:
    """The saved run's config with this command line's overrides (and raw path settings) on top.

    Every override takes effect (train.lr included) or is refused here: a resumed run keeps its
    text and its model's shape. Repeating the run's own choices (data=..., model=...) is fine.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from charlm.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(cfg.train.resume, prefer="last.pt")
    state = load_checkpoint(path)
    saved = OmegaConf.merge(OmegaConf.structured(Config), _literal_tree(state["config"]))
    merged = saved.copy()
    given = OverridesParser.create().parse_overrides(overrides)
    for o in given:
        # a group choice stands for what it sets, as this command composes it: data=... and
        # model=... their section, recipe=... the model and train sections
        sections = {"data": ["data"], "model": ["model"], "recipe": ["model", "train"]}.get(o.key_or_group)
        try:
            for key in sections or [o.key_or_group]:
                value = OmegaConf.to_container(cfg[key], resolve=True) if sections else o.value()
                OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as e:
            fail(f"{o.input_line}: {str(e).splitlines()[0]}")
    with_raw(merged, {k: v for k, v in raw.items() if k != "train.resume"})
    lines = [(o.key_or_group, o.input_line) for o in given] + [(k, f"{k}={v}") for k, v in raw.items()]
    fixed = {"data": ("name", "path", "train_frac", "val_frac"), "model": MODEL_SHAPE}
    for section, keys in fixed.items():
        for k in keys:
            if merged[section][k] != saved[section][k]:
                culprit = [line for key, line in lines if key in (section, f"{section}.{k}", "recipe")][-1]
                fail(f"{culprit} would change {section}.{k} from {saved[section][k]} to {merged[section][k]},"
                     " which a resumed run cannot; drop it, or start a new run")
    merged.train.resume = literal(str(path))
    return _to_object(merged, Config), state


def _literal_tree(d: Any) -> Any:
    """A saved config (plain data) with every string made literal() for OmegaConf."""
    if isinstance(d, dict):
        return {k: _literal_tree(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_literal_tree(v) for v in d]
    return literal(d) if isinstance(d, str) else d


def _init_from_config(cfg: DictConfig, overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    """This command's config with the model's size taken from train.init_from's checkpoint.

    A model setting given on the command line applies where it fits the weights (dropout); one
    that contradicts them (model.d_model, n_layers, cell, or a model= size) is refused here.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from charlm.checkpoint import load_checkpoint, resolve_checkpoint

    path = resolve_checkpoint(cfg.train.init_from, prefer="best.pt")
    state = load_checkpoint(path)
    saved = OmegaConf.merge(OmegaConf.structured(Config().model), state["model_config"])
    merged = cfg.copy()
    merged.model = saved
    given = [o for o in OverridesParser.create().parse_overrides(overrides)
             if o.key_or_group == "model" or o.key_or_group.startswith("model.")]
    for o in given:
        key = o.key_or_group
        value = OmegaConf.to_container(cfg.model, resolve=True) if key == "model" else o.value()
        OmegaConf.update(merged, key, value, merge=True)
        for k in MODEL_SHAPE:
            if merged.model[k] != saved[k]:
                fail(f"{o.input_line} would make model.{k} {merged.model[k]}, but train.init_from={path} is a"
                     f" {saved.d_model}x{saved.n_layers} {saved.cell} model; drop it, or start from scratch")
    merged.train.init_from = literal(str(path.resolve()))  # the record in config.yaml and HParams
    return _to_object(merged, Config), state


def run_train(cfg: DictConfig, raw: dict[str, str]) -> None:
    """Body of `python train.py`; raw holds the path settings exactly as typed."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    def go() -> None:
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        with_raw(cfg, raw)
        state = init = None
        if cfg.train.resume and cfg.train.init_from:
            raise CharlmError("give train.resume (continue a run) or train.init_from (start a new run from its"
                              " weights), not both")
        if cfg.train.resume and cfg.overwrite:
            raise CharlmError("give train.resume (continue a run) or overwrite=true (start it over), not both")
        if cfg.train.resume:
            config, state = _resume_config(cfg, overrides, raw)
        elif cfg.train.init_from:
            config, init = _init_from_config(cfg, overrides)
        else:
            config = _to_object(cfg, Config)
        if hydra_cfg.mode == RunMode.MULTIRUN and "out_dir" not in raw:
            config.out_dir = hydra_cfg.runtime.output_dir  # one directory per job of a sweep
        from charlm.training.loop import train  # torch is imported only once the config is known to be good

        summary = train(config, Path(config.out_dir), resume_state=state, init_state=init)
        if "stopped_by" in summary:  # Ctrl-C or SIGTERM: saved; the shell's code for that signal
            sys.exit(128 + summary["stopped_by"])

    _guarded(go)


def pop_raw_args(argv: list[str], keys: tuple[str, ...]) -> dict[str, str]:
    """Take `key=value` arguments for keys out of argv, values exactly as the shell passed them.

    Hydra's override grammar would reject or reinterpret free text and file names (commas,
    quotes, brackets, `=`, non-ASCII), so prompts and paths never go through it.
    """
    raw = {}
    for arg in list(argv[1:]):
        key, sep, value = arg.partition("=")
        if sep and key in keys:
            raw[key] = value
            argv.remove(arg)
    return raw


def literal(value: str) -> str:
    """value as OmegaConf will read it back unchanged: `${` is escaped, so no interpolation runs.

    >>> literal("a ${b}")
    'a \\\\${b}'
    """
    return re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", value)


def with_raw(cfg: DictConfig, raw: dict[str, str]) -> DictConfig:
    """The composed config with the raw `key=value` arguments set, as plain strings."""
    for key, value in raw.items():
        OmegaConf.update(cfg, key, literal(value), merge=False)
    return cfg


def run_sample(cfg: DictConfig, raw: dict[str, str]) -> None:
    """`python sample.py`; raw holds the prompt, stop text and paths exactly as typed."""
    _guarded(lambda: sample(_to_object(with_raw(cfg, raw), SampleConfig)))


def read_prompt(cfg: SampleConfig) -> str:
    """The prompt text: prompt=, or the contents of prompt_file= (UTF-8)."""
    if not cfg.prompt_file:
        return cfg.prompt
    path = Path(cfg.prompt_file)
    if not path.is_file():
        raise CharlmError(f"prompt_file={path} is not a file")
    return path.read_bytes().decode("utf-8", errors="replace")


def sample(cfg: SampleConfig) -> None:
    """Print the prompt and `length` new bytes (per sample) to stdout, streamed.

    With stop=..., a sample ends after the first occurrence of that text instead.
    """
    import random

    import torch  # only once the config is known to be good

    from charlm.checkpoint import load_checkpoint, locate_checkpoint, model_from_state
    from charlm.device import resolve_device
    from charlm.inference.sampling import sample_text, stream_text

    path = locate_checkpoint(cfg.checkpoint)
    state = load_checkpoint(path)
    device = resolve_device(cfg.device)
    model = model_from_state(state).to(device).eval()
    prompt = read_prompt(cfg)
    seed = cfg.seed if cfg.seed is not None else random.randrange(2**31)
    generator = torch.Generator(device=device).manual_seed(seed)
    print(f"[{path} | step {state['step']} | val loss {state['best_val_loss']:.4f} | "
          f"temperature {cfg.temperature} | seed {seed}]", file=sys.stderr)
    if cfg.explain:
        return _explain(model, prompt, cfg, generator)
    if cfg.interactive:
        return _interactive(model, prompt, cfg, generator)
    kwargs = dict(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, stop=cfg.stop, generator=generator)
    if cfg.num_samples == 1:
        sys.stdout.write(prompt)
        for piece in stream_text(model, prompt, cfg.length, **kwargs):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i, text in enumerate(sample_text(model, prompt, cfg.length, num_samples=cfg.num_samples, **kwargs)):
        if i:
            print("-" * 40)
        print(text)


def _interactive(model: Any, prompt: str, cfg: SampleConfig, generator: Any) -> None:
    """sample.py interactive=true: a line in, `length` bytes of continuation out, one text throughout.

    On a terminal a hint and a "> " prompt go to stderr; through a pipe nothing but the model's
    text is written, each turn ending with a line break, so a script can drive it.
    """
    from charlm.inference.sampling import Conversation

    terminal = sys.stdin.isatty()
    talk = Conversation(model, cfg.temperature, cfg.top_k, cfg.top_p, generator)

    def turn(text: str) -> None:
        talk.read(text.encode("utf-8"))
        written = ""
        for piece in talk.write_text(cfg.length, cfg.stop):
            sys.stdout.write(piece)
            sys.stdout.flush()
            written = piece
        # a turn ends with a line break: the model's own (stop=$'\n': one line per turn), or one added
        sys.stdout.write("" if written.endswith("\n") else "\n")
        sys.stdout.flush()

    if terminal:
        print("Type a line and press Enter: the model continues it. An empty line lets it go on;"
              " Ctrl-D ends.", file=sys.stderr)
    if prompt:
        sys.stdout.write(prompt)
        turn(prompt)
    try:
        while True:
            if terminal:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:  # Ctrl-D, or the end of the piped input
                break
            turn(line.rstrip("\r\n"))
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        sys.exit(130)


def _explain(model: Any, prompt: str, cfg: SampleConfig, generator: Any) -> None:
    """sample.py explain=true: each generated byte with its top 5 and every layer's gates."""
    from charlm.inference.explain import explain_steps, format_json, format_step

    text = prompt.encode("utf-8")
    for s in explain_steps(model, text, cfg.length, cfg.temperature, cfg.top_k, cfg.top_p, generator):
        print(format_json(s) if cfg.explain_format == "json" else format_step(s) + "\n", flush=True)
        text += bytes((s["byte"],))
    if cfg.explain_format == "text":
        print("text: " + text.decode("utf-8", errors="replace"))


def run_evaluate(cfg: DictConfig, raw: dict[str, str]) -> None:
    """Body of `python evaluate.py`; raw holds the path settings exactly as typed."""
    from hydra.core.hydra_config import HydraConfig

    def go() -> None:
        config = _to_object(with_raw(cfg, raw), EvaluateConfig)
        given = [o.lstrip("+~").split("=")[0].split(".")[0] for o in [*HydraConfig.get().overrides.task, *raw]]
        evaluate(config, data_given="data" in given)

    _guarded(go)


def evaluate(cfg: EvaluateConfig, data_given: bool = True) -> dict[str, Any]:
    """`python evaluate.py`: score a split (or a whole file) and print the figures.

    Without data= on the command line (data_given False), the checkpoint's own corpus is scored.
    """
    from charlm.inference.scoring import dynamic_loss, evaluate_loss, metrics

    if cfg.html and (Path(cfg.html).is_dir() or not Path(cfg.html).resolve().parent.is_dir()):
        raise CharlmError(f"html={cfg.html}: give a file name in a directory that exists")
    path, model, text_path, which, data = _scored_text(cfg, data_given)
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with _progress(len(data), "scoring") as bar:
        loss, n = evaluate_loss(model, data, seq_len=EVALUATE_SEQ_LEN, lanes=1, device=device, progress=bar.update)
    result = {"checkpoint": str(path), "data": str(text_path), "split": which, "bytes": n, **metrics(loss),
              "seconds": round(time.perf_counter() - t0, 3)}
    if cfg.dynamic:
        t0 = time.perf_counter()
        with _progress(len(data), "dynamic") as bar:
            dyn, _ = dynamic_loss(model, data, cfg.dynamic_window, cfg.dynamic_lr, device, progress=bar.update)
        result.update({f"dynamic_{k}": v for k, v in metrics(dyn).items()},
                      dynamic_lr=cfg.dynamic_lr, dynamic_window=cfg.dynamic_window,
                      dynamic_seconds=round(time.perf_counter() - t0, 3))
    if cfg.html:
        result["html"] = str(_write_html(cfg, model, path, text_path, which, data, result["bpb"]))
    if cfg.format == "json":
        print(json.dumps(result, allow_nan=False))
        return result
    lines = [f"{text_path} [{which}] scored by {path}", f"bytes:       {n:,}"]
    rows = [("loss", "loss", " nats/byte", ".4f"), ("perplexity", "perplexity", "", ".3f"),
            ("bits/byte", "bpb", "", ".4f")]
    if cfg.dynamic:
        lines.append(f"{'':13}{'static':>10}  {'dynamic':>10}   (dynamic_lr={cfg.dynamic_lr:g},"
                     f" dynamic_window={cfg.dynamic_window})")
        lines += [f"{name + ':':13}{result[key]:>10{fmt}}  {result['dynamic_' + key]:>10{fmt}}{unit}"
                  for name, key, unit, fmt in rows]
    else:
        lines += [f"{name + ':':13}{result[key]:{fmt}}{unit}" for name, key, unit, fmt in rows]
    if cfg.html:
        lines.append(f"page:        {result['html']}")
    print("\n".join(lines))
    return result


def _progress(total: int, what: str) -> Any:
    """A bar on stderr for a long scoring, shown on a terminal only (stdout keeps just the figures)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=what, unit="B", unit_scale=True, file=sys.stderr, leave=False,
                disable=None if total >= 100_000 else True)


def _scored_text(cfg: EvaluateConfig, data_given: bool) -> tuple[Path, Any, Path, str, Any]:
    """(checkpoint path, its model on cfg.device, the text's path, the split's name, its bytes).

    Without data= on the command line the checkpoint's own text and split fractions are used; the
    split defaults to test, else val (said on stderr), or the whole file for data=text.
    """
    from charlm.checkpoint import load_checkpoint, locate_checkpoint, model_from_state
    from charlm.config import DataConfig
    from charlm.data.batches import split
    from charlm.data.text import corpus_path, load_bytes
    from charlm.device import resolve_device

    path = locate_checkpoint(cfg.checkpoint)
    device = resolve_device(cfg.device)
    state = load_checkpoint(path)
    model = model_from_state(state).to(device)
    data_cfg = cfg.data if data_given else DataConfig(**state["config"]["data"])
    text_path = corpus_path(data_cfg, lambda message: print(message, file=sys.stderr))
    data = load_bytes(text_path)
    parts = split(data, data_cfg.train_frac, data_cfg.val_frac)
    which, note = cfg.split, ""
    if which is None and data_given and data_cfg.name == "text":
        which = "all"  # a file of one's own: all of it
    elif which is None:
        which = "test" if len(parts["test"]) else "val"
        if which == "val":
            note = f"{data_cfg.name} has no test split (data.train_frac + data.val_frac = 1): scoring val"
    if which != "all":
        data = parts[which]
    if len(data) == 0:
        raise CharlmError(
            f"split={which} of {text_path} is empty at data.train_frac={data_cfg.train_frac},"
            f" data.val_frac={data_cfg.val_frac}; choose another split (train, val, test or all)"
        )
    if note:
        print(note, file=sys.stderr)
    return path, model, text_path, which, data


def _write_html(cfg: EvaluateConfig, model: Any, path: Path, text_path: Path, which: str, data: Any,
                bpb_all: float) -> Path:
    """evaluate.py html=FILE: the first html_bytes of the scored text, read through the model."""
    from charlm.inference.reading import read_text, write_page

    out = Path(cfg.html)
    shown = bytes(data[: cfg.html_bytes])
    numbers = read_text(model, shown, next(model.parameters()).device)
    about = {"title": f"{text_path.name} [{which}] through {path}", "source": f"{text_path} [{which}]",
             "checkpoint": str(path), "cell": model.config.cell, "total": len(data), "bpb_all": bpb_all}
    return write_page(out, shown, numbers, about)
