"""``python -m acpo_lightning``: the ``acpo`` command."""

from acpo_lightning.cli import main

if __name__ == "__main__":  # importing this module (doctest collection, tools) runs nothing
    main()
