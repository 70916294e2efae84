"""``python -m deltacomp.cli`` (and ``torchrun ... -m deltacomp.cli``): the ``deltacomp`` command."""

from deltacomp.cli import main

main()
