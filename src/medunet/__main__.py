"""``python -m medunet`` is the ``medunet`` command (what ``torchrun -m medunet train`` starts)."""

from medunet.cli import main

if __name__ == "__main__":
    main()
