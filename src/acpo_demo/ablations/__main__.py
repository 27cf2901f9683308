"""``python -m acpo_demo.ablations``: see :func:`acpo_demo.ablations.main`."""

from acpo_demo.ablations import main

if __name__ == "__main__":
    main()
