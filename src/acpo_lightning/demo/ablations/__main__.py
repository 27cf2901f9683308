"""``python -m acpo_lightning.demo.ablations``: see :func:`acpo_lightning.demo.ablations.main`."""

from acpo_lightning.demo.ablations import main

if __name__ == "__main__":
    main()
