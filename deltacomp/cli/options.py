"""Click options generated from a config dataclass's fields (:func:`deltacomp.config.setting`): the default, the
type, the choices and the help of an option live once, on the field."""

from __future__ import annotations

import dataclasses

import click


def _option(f: dataclasses.Field) -> click.Option:
    meta = f.metadata
    flag = meta["flag"] or "--" + f.name.replace("_", "-")
    default = meta["shown"] if meta["shown"] is not None else f.default
    kw = {"help": meta["help"]}
    if meta["multiple"]:
        kw["multiple"] = True
    elif meta["is_flag"]:
        kw["is_flag"] = True
    else:
        kw["default"] = default
        kw["show_default"] = default is not None
    if meta["choices"]:
        kw["type"] = click.Choice(list(meta["choices"]))
    elif meta["type"] == "path":
        kw["type"] = click.Path()
    elif meta["type"] is not None:
        kw["type"] = meta["type"]
    elif not meta["multiple"] and not meta["is_flag"] and default is not None and not isinstance(default, bool):
        kw["type"] = type(default)
    if meta["metavar"]:
        kw["metavar"] = meta["metavar"]
    return click.option(flag, f.name, **kw)


def config_options(cls, order: list[str]):
    """Decorator: one click option per field of ``cls`` named in ``order`` (their order in ``--help``)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    missing = [n for n in order if n not in by_name or not by_name[n].metadata.get("cli")]
    if missing:
        raise ValueError(f"{cls.__name__} has no command-line setting {', '.join(missing)}")

    def wrap(fn):
        for name in reversed(order):
            fn = _option(by_name[name])(fn)
        return fn

    return wrap
