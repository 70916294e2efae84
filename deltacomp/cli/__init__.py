"""The ``deltacomp`` command: a thin shell over the library. Errors print as one line, exit status 1.

Each module of this package adds its commands to :data:`cli`; importing them here registers them.
"""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from deltacomp import __version__
from deltacomp.errors import DeltacompError


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn):
    """Turn library errors (and anything unexpected) into one clear line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeltacompError as e:
            _fail(str(e))
        except KeyboardInterrupt:
            _fail("interrupted; no output was left behind", 130)
        except MemoryError:
            _fail("out of memory")
        except OSError as e:
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _fail(f"{where}{e.strerror or e}")
        except Exception as e:  # the last line of defence: still one line, never a traceback
            if os.environ.get("DELTACOMP_DEBUG"):
                raise
            _fail(f"internal error ({type(e).__name__}: {e}); set DELTACOMP_DEBUG=1 for the traceback")

    return wrapper


class _Formatter(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {record.getMessage()}"


def _verbose_callback(ctx, param, value):
    if value:  # the group has set up the handler already; a subcommand's -v only lowers the level
        logging.getLogger("deltacomp").setLevel(logging.INFO)
    return value


def verbose_option(fn):
    """``-v/--verbose`` on a subcommand too (``deltacomp compress ... -v``): log details, show per-module tables."""
    return click.option("-v", "--verbose", is_flag=True, callback=_verbose_callback,
                        help="Log progress details (and, where a command has one, show the per-module table).")(fn)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="deltacomp")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def cli(verbose: bool):
    """Compress the delta between a fine-tuned model and its base; ship it; apply it back."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("deltacomp")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    root.propagate = False


from deltacomp.cli import core, eval  # noqa: E402,F401  (registers the commands)

# isort: split
from deltacomp.cli import doctor, export, hub  # noqa: E402,F401  (doctor, export, push, pull)

from deltacomp.cli import fuse  # noqa: E402,F401  # isort: skip  (fuse create, train, generate, eval)


def _sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: partial outputs are removed


def main():
    import signal

    from deltacomp.distributed import exit_process

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        cli(prog_name="deltacomp")
        code = 0
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # sys.exit("message")
        click.echo(code, err=True)
    exit_process(code if isinstance(code, int) else int(code is not None))


if __name__ == "__main__":
    main()
