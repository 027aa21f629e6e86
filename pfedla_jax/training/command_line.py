"""`experiments.run`'s command line, generated from the config dataclasses.

Every flag comes from a dataclass field: `ExperimentConfig` (its `train` fields,
`LocalTrainConfig`, are flat flags: `--lr`, `--batch_size`, ...), `RunOptions`, the
command's own options below (`--workdir`, `--quiet`, `--import`, the multi-process flags)
and every registered algorithm's config, `--<algorithm>_<field>` (nested dataclasses
`--<algorithm>_<group>_<field>`; a field's `metadata['alias']` adds a second name, e.g.
pFedLA's historical `--hn_lr` for `--pfedla_hn_lr`). Defaults and help texts are the
fields' own, so they are written once.

  command = config_from_argv(["prog", "--algorithm=pfedla", "--rounds=5"])
  command.config, command.options    # a validated ExperimentConfig and RunOptions

Each call parses into a fresh `absl.flags.FlagValues`: nothing is added to absl's global
`FLAGS`, so importing this module, or a tool that uses it, defines no flag of any other
tool. `--import=MODULE` (or a .py path) imports a module that registers algorithms before
the flags are generated, so its options are flags too. `help_text` is the `--help` page,
grouped by section, with the options of `--algorithm` only when one is given.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from pfedla_jax.algorithms.registry import algorithm_class, algorithm_names, config_fields, replace_paths
from pfedla_jax.data.partition.registry import get_scheme, scheme_names
from pfedla_jax.errors import UserInputError
from pfedla_jax.training import config as config_lib
from pfedla_jax.training.config import ExperimentConfig, RunOptions, option

COMMAND, PROCESSES = "run", "several processes"
HELP_FLAGS = ("help", "h", "helpshort", "helpfull", "?")
_FLAG_TYPES = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}


@dataclasses.dataclass(frozen=True)
class CommandOptions:
    """The options of a command that are not part of a run's config.

    Attributes:
      workdir: the run's directory (metrics, checkpoints, ...); None = nothing written.
      quiet: print only the final table.
      imports: modules (dotted names, or paths of .py files) imported before the flags are
        read; an algorithm they register is usable by name, its options as flags.
      coordinator_address, num_processes, process_id, distributed_timeout_s: a run over
        several processes (core/multihost.py).
    """

    workdir: str | None = option(None, "Output directory (re-running the command with the same "
                                 "--workdir resumes).", COMMAND)
    quiet: bool = option(False, "Only print the final table (no per-round progress lines).", COMMAND)
    imports: tuple[str, ...] = option(
        (), "A module (my_package.my_algorithm, or path/to/file.py) to import before the flags "
        "are read: the algorithms it registers are usable by name, their options as flags. "
        "Repeatable.", COMMAND, flag="import")
    coordinator_address: str = option(
        "", "host:port of process 0, the same for every process (process 0 listens there). "
        "experiments.launch sets it for local processes.", PROCESSES)
    num_processes: str = option(
        "1", "Processes of the run, each with its own devices, all on one global mesh: 1 | N | "
        "auto (jax.distributed detects SLURM, Open MPI, Kubernetes, Cloud TPU).", PROCESSES)
    process_id: int = option(0, "This process, 0..num_processes-1.", PROCESSES)
    distributed_timeout_s: int = option(
        60, "Seconds for every process to join (then one error line and exit 2).", PROCESSES)


@dataclasses.dataclass(frozen=True)
class RunCommand:
    """A parsed `experiments.run` command line.

    Attributes:
      config: the experiment (validated).
      options: how it runs (validated).
      command: workdir, quiet, imports and the multi-process options.
      flag_values: the parsed flags (a tool's own flags, defined with `extra`, are read here).
    """

    config: ExperimentConfig
    options: RunOptions
    command: CommandOptions
    flag_values: flags.FlagValues


@dataclasses.dataclass(frozen=True)
class FlagSpec:
    """One generated flag.

    Attributes:
      name: the flag name.
      target: where its value goes: 'config', 'train', 'options', 'command', or
        'algorithm:<name>'.
      path: the field's (dotted) path inside that target.
      default: the default (its type is the flag's type).
      help: the help text.
      section: the --help section.
      alias: a second name, or ''.
    """

    name: str
    target: str
    path: str
    default: Any
    help: str
    section: str
    alias: str = ""


def _fields_of(cls, target: str, skip: Sequence[str] = ()) -> list[FlagSpec]:
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(FlagSpec(f.metadata.get("flag", f.name), target, f.name, default,
                            f.metadata.get("help", ""), f.metadata.get("section", target)))
    return out


def algorithm_section(name: str) -> str:
    cls = algorithm_class(name)
    return f"{cls.display_name or name} options (--algorithm={name})"


def flag_specs() -> list[FlagSpec]:
    """Every flag of `experiments.run`, in --help order (sections as they first appear)."""
    generated = {  # the choices of these two come from their registries
        "algorithm": lambda h: f"{' | '.join(algorithm_names())}. {h}",
        "partition": lambda h: h + " Schemes: " + " | ".join(
            f"{n} ({get_scheme(n).description})" for n in scheme_names()) + ".",
    }
    specs = [dataclasses.replace(s, help=generated[s.path](s.help)) if s.path in generated else s
             for s in _fields_of(ExperimentConfig, "config", skip=("train", "algorithm_config"))]
    specs += [dataclasses.replace(s, section=config_lib.TRAINING)
              for s in _fields_of(config_lib.LocalTrainConfig, "train")]
    specs += _fields_of(RunOptions, "options") + _fields_of(CommandOptions, "command")
    for name in algorithm_names():
        specs += _algorithm_specs(name)
    return specs


def define_flags(flag_values: flags.FlagValues) -> list[FlagSpec]:
    """Defines every flag of `flag_specs()` in `flag_values`; returns the specs.

    Raises:
      UserInputError: two fields claim the same flag name (e.g. an imported algorithm's
        option and another's alias).
    """
    specs = flag_specs()
    owner: dict[str, FlagSpec] = {}
    for spec in specs:
        for name in filter(None, (spec.name, spec.alias)):
            if name in owner or name in flag_values:
                first = owner.get(name)
                raise UserInputError(
                    f"flag --{name} of {spec.target} ({spec.path}) is also "
                    + (f"a flag of {first.target} ({first.path})" if first else "defined by the tool")
                    + "; rename the field or its alias")
            owner[name] = spec
        if spec.target == "command" and spec.path == "imports":
            flags.DEFINE_multi_string(spec.name, list(spec.default), spec.help, flag_values=flag_values)
        else:
            define = _FLAG_TYPES.get(type(spec.default), flags.DEFINE_string)
            define(spec.name, spec.default, spec.help, flag_values=flag_values)
        if spec.alias:
            flags.DEFINE_alias(spec.alias, spec.name, flag_values=flag_values)
    return specs


# ----------------------------------------------------------------------------- --import


def plugin_names(argv: Sequence[str]) -> list[str]:
    """The --import values of `argv` (flag files included), without reading anything else.

    Raises:
      UserInputError: a flag file that cannot be read.
    """
    values = flags.FlagValues()
    flags.DEFINE_multi_string("import", [], "", flag_values=values)
    try:
        values(list(argv), known_only=True)
    except flags.Error as e:
        raise UserInputError(str(e)) from None
    return list(values["import"].value or [])


def import_plugin(spec: str) -> None:
    """Imports a module by dotted name, or a .py file by path (run as its own module).

    Raises:
      UserInputError: the module cannot be found or raises while it is imported.
    """
    try:
        if spec.endswith(".py") or os.sep in spec:
            path = os.path.abspath(spec)
            if not os.path.isfile(path):
                raise UserInputError(f"--import={spec}: no such file")
            name = "pfedla_plugin_" + os.path.splitext(os.path.basename(path))[0]
            if name in sys.modules:
                return
            module_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does
            importlib.import_module(spec)
    except UserInputError:
        raise
    except Exception as e:  # any error of the user's module: one line
        raise UserInputError(f"--import={spec}: {type(e).__name__}: {e}") from None


def import_plugins(argv: Sequence[str]) -> list[str]:
    """Imports every --import module of `argv`; returns their names."""
    names = plugin_names(argv)
    for name in names:
        import_plugin(name)
    return names


# ----------------------------------------------------------------------------- parsing


def parse(argv: Sequence[str], extra: Callable[[flags.FlagValues], None] | None = None
          ) -> flags.FlagValues:
    """Imports the --import modules of `argv`, generates the flags (plus a tool's own,
    defined by `extra`) in a fresh FlagValues and parses `argv` (argv[0] is the program).

    Raises:
      UserInputError: an unknown flag, a value of the wrong type, an unreadable flag file,
        or an --import that fails.
    """
    import_plugins(argv)
    values = flags.FlagValues()
    define_flags(values)
    try:
        if extra is not None:
            extra(values)
        rest = values(list(argv))
    except flags.Error as e:
        raise UserInputError(str(e)) from None
    if len(rest) > 1:
        raise UserInputError(f"unexpected arguments: {' '.join(rest[1:])}")
    return values


def algorithm_config_from_flags(name: str, values: flags.FlagValues) -> Any:
    """Algorithm `name`'s config with every field taken from its flag."""
    fields = {spec.path: values[spec.name].value for spec in _algorithm_specs(name)}
    return replace_paths(algorithm_class(name).config_class(), fields)


def _algorithm_specs(name: str) -> list[FlagSpec]:
    section = algorithm_section(name)
    return [FlagSpec(f.flag, f"algorithm:{name}", f.path, f.default, f.help, section, f.alias)
            for f in config_fields(name)]


def command_from_flags(values: flags.FlagValues, strict: bool = True) -> RunCommand:
    """The RunCommand of parsed flags.

    With `strict`, an option of an algorithm other than --algorithm is an error (it would
    silently do nothing); experiments.sweep passes strict=False (its runs switch algorithms
    and take each algorithm's options from the flags).

    Raises:
      UserInputError: a bad value or combination (every config is checked as it is built).
    """
    chosen = values["algorithm"].value
    algorithm_class(chosen)  # unknown -> UserInputError listing the algorithms
    if strict:
        for other in algorithm_names():
            if other == chosen:
                continue
            for spec in _algorithm_specs(other):
                if values[spec.name].present:
                    given = spec.alias if spec.alias and values[spec.alias].present else spec.name
                    raise UserInputError(f"--{given} is an option of --algorithm={other}, not of "
                                         f"--algorithm={chosen}")
    read = lambda cls, target, skip=(): {s.path: values[s.name].value
                                         for s in _fields_of(cls, target, skip)}
    train = config_lib.LocalTrainConfig(**read(config_lib.LocalTrainConfig, "train"))
    config = ExperimentConfig(**read(ExperimentConfig, "config", ("train", "algorithm_config")),
                              train=train,
                              algorithm_config=algorithm_config_from_flags(chosen, values))
    options = RunOptions(**read(RunOptions, "options"))
    command = read(CommandOptions, "command")
    command["imports"] = tuple(command["imports"] or ())
    return RunCommand(config, options, CommandOptions(**command), values)


def config_from_argv(argv: Sequence[str], strict: bool = True,
                     extra: Callable[[flags.FlagValues], None] | None = None) -> RunCommand:
    """Parses an `experiments.run` command line into validated configs.

    Args:
      argv: the command line, argv[0] the program (e.g. sys.argv).
      strict: refuse options of an algorithm other than --algorithm.
      extra: defines a tool's own flags in the FlagValues (read them from
        `RunCommand.flag_values`).

    Returns:
      a RunCommand: config (ExperimentConfig), options (RunOptions), command
      (CommandOptions), flag_values.

    Raises:
      UserInputError: anything wrong with the command line, as one line of text.
    """
    return command_from_flags(parse(argv, extra), strict)


def wants_help(argv: Sequence[str]) -> bool:
    return any(a.split("=", 1)[0].lstrip("-") in HELP_FLAGS for a in argv[1:] if a.startswith("-"))


# ----------------------------------------------------------------------------- --help

_SECTION_ORDER = ("algorithm", config_lib.DATA, config_lib.SCHEDULE, config_lib.TRAINING,
                  config_lib.MODEL)


def help_text(program: str, argv: Sequence[str] = (), summary: str = "",
              extra: Callable[[flags.FlagValues], None] | None = None) -> str:
    """The --help page: flags grouped by section, each with its default.

    The algorithm sections: only the chosen algorithm's when `argv` names --algorithm, else
    one per registered algorithm. A tool's own flags (`extra`) come first.
    """
    try:
        import_plugins(list(argv) or [program])
    except UserInputError:
        pass
    values = flags.FlagValues()
    chosen = None
    probe = flags.FlagValues()
    flags.DEFINE_string("algorithm", None, "", flag_values=probe)
    try:
        probe([program, *[a for a in argv[1:] if not a.split("=", 1)[0].lstrip("-") in HELP_FLAGS]],
              known_only=True)
        chosen = probe["algorithm"].value
    except flags.Error:
        pass
    specs = flag_specs()
    sections: dict[str, list[FlagSpec]] = {}
    for spec in specs:
        if spec.target.startswith("algorithm:") and chosen in algorithm_names() and \
                spec.target != f"algorithm:{chosen}":
            continue
        sections.setdefault(spec.section, []).append(spec)
    lines = [f"usage: python -m {program} [flags]", ""]
    if summary:
        lines += [summary.strip(), ""]
    if extra is not None:
        extra(values)
        own = [values[name] for name in sorted(values) if name == values[name].name]
        if own:
            lines.append(f"{program} flags:")
            lines += [_format_flag(f.name, f.default, f.help) for f in own]
            lines.append("")
    shown = [chosen] if chosen in algorithm_names() else list(algorithm_names())
    algorithms = [algorithm_section(n) for n in shown]
    every = {algorithm_section(n) for n in algorithm_names()}
    order = [s for s in _SECTION_ORDER if s in sections] + algorithms + \
        [s for s in sections if s not in _SECTION_ORDER and s not in every]
    for section in order:
        lines.append(f"{section}:")
        if not sections.get(section):
            lines.append("  (no options)")
        for spec in sections.get(section, ()):
            name = spec.name + (f" (or --{spec.alias})" if spec.alias else "")
            lines.append(_format_flag(name, spec.default, spec.help))
        lines.append("")
    if chosen not in algorithm_names():
        lines.append("(with --algorithm=NAME, --help shows that algorithm's options only)")
    lines.append("Flags can come from a file: --flagfile=FILE. Bad flags or inputs print one line "
                 "`error: ...` and exit with status 2.")
    return "\n".join(lines)


def _format_flag(name: str, default: Any, help_text_: str) -> str:
    shown = "''" if default == "" else ("none" if default is None or default == () else
                                        str(default).lower() if isinstance(default, bool) else default)
    body = textwrap.fill(f"{help_text_} (default: {shown})", width=92, initial_indent="      ",
                         subsequent_indent="      ")
    return f"  --{name}\n{body}"
