"""``python -m attngen``: the attngen command line (attngen.cli)."""
from attngen.cli import main

if __name__ == "__main__":
    main(prog_name="attngen")
